"""Data readers: caption datasets (Flickr, Karpathy, COCO, CSV/JSONL, WebDataset shards), the
vocabulary, images from a file to the model's input, and files written atomically. Nothing here
loads a model."""
