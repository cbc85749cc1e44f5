"""What the tests share: fake embedders, real processes and servers, data, clients."""
