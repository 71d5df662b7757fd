"""The network's building blocks as Keras layers: convs, normalization, cells, flows, groups."""
