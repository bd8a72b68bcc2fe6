"""Where tiles go and how their outputs are combined: geometry, tile input, crop/blend stitching, blocks."""
