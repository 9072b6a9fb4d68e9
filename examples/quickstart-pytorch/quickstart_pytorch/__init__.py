"""A small FedAvg-style PyTorch Flower app, switched to decentralized HyperPrism."""
