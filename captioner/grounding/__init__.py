"""What the image shows, beyond the decoder's own reading: the encoder's ImageNet labels and their
everyday words, concept and object detectors, and the decode-time penalties and animal names
they drive."""
