"""Model-side helpers the programs share: loading pretrained weights into a classifier or a dense
backbone (pretrained.py) and reconstruction figures (visualize.py)."""
