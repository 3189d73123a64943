# the decoders --decode names (imagedata.decode implements them); here, so that a parser needs no torch
DECODERS = ("pil", "fast", "gpu")
