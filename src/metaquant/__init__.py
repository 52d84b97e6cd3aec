"""metaquant: train networks with low-bit weights, with a learned gradient through the quantizer."""
