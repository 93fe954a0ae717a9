"""Training of the project's own CIFAR ResNets (``tta-server train``)."""
