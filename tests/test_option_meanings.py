"""What options mean, said and checked where the user meets them (the red-team findings F3-F8): memory sizes and
their units, options a run cannot use, notes that name the real output format, messages that name values as typed."""

from __future__ import annotations

import pytest

from click.testing import CliRunner

from volinfer import portable
from volinfer.cli import main
from volinfer.errors import VolinferError
from volinfer.options import check_budget_mb, format_mb, parse_size_mb


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args], prog_name="volinfer")


@pytest.mark.parametrize("text, mb", [("600", 600.0), ("600M", 600.0), ("600MB", 600.0), ("600MiB", 600.0),
                                      ("600mib", 600.0), ("1.5G", 1536.0), ("1.5GiB", 1536.0), ("2 GB", 2048.0),
                                      ("1K", 1 / 1024), ("512KiB", 0.5), ("1T", 1024.0**2), ("1e3", 1000.0)])
def test_memory_sizes_take_binary_units_with_or_without_b_or_ib(text, mb):
    assert parse_size_mb(text) == mb


@pytest.mark.parametrize("text", ["600B", "600iB", "lots", "1.5X", "", "inf", "-5M"])
def test_memory_sizes_refuse_what_is_not_a_size(text):
    with pytest.raises(VolinferError, match=r"^memory size must look like 600M or 1\.5G \(K, M, G, T, also as KB or "
                                            r"KiB; a bare number is MB\); got "):
        parse_size_mb(text)


def test_a_budget_above_the_machine_is_refused_naming_the_value_as_given(monkeypatch):
    monkeypatch.setattr(portable, "machine_mb", lambda: 16000.0)
    with pytest.raises(VolinferError) as e:
        check_budget_mb("--max-memory", parse_size_mb("1e9"), "1e9")
    assert str(e.value) == ("--max-memory 1e9 (1000000000 MB) is more than this machine's 16000 MB (its RAM, or its "
                            "cgroup limit if lower); a bare number is MB")
    with pytest.raises(VolinferError) as e:
        check_budget_mb("--max-memory", parse_size_mb("20G"), "20G")
    assert str(e.value) == ("--max-memory 20G (20480 MB) is more than this machine's 16000 MB (its RAM, or its "
                            "cgroup limit if lower)")
    assert check_budget_mb("--max-memory", 16000.0, "16000") == 16000.0


def test_small_budgets_are_shown_in_kb_not_as_0_mb():
    assert format_mb(parse_size_mb("1K")) == "1 KB" and format_mb(0.5) == "512 KB" and format_mb(600.4) == "600 MB"


def test_cli_refuses_a_budget_above_the_machine_in_one_line(tmp_path, monkeypatch):
    monkeypatch.setattr(portable, "machine_mb", lambda: 16000.0)
    r = invoke("plan", tmp_path / "v.nii", "-m", tmp_path / "m.xml", "--max-memory", "1e9")
    machine = "16000 MB"
    assert r.exit_code == 2 and r.output.strip().splitlines() == [
        f"error: --max-memory 1e9 (1000000000 MB) is more than this machine's {machine} (its RAM, or its cgroup "
        f"limit if lower); a bare number is MB (see 'volinfer plan --help')"], r.output
