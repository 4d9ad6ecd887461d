"""The LitServe peer's API (a module of its own: LitServe pickles it into its worker processes)."""
from __future__ import annotations

import litserve as ls
import torch

from bench.peer_model import decode, full_model, load


class ThinkingViTFull(ls.LitAPI):
    """The full model with LitServe's batching: decode per request, stack, one forward, unbatch."""

    def __init__(self, checkpoint: str, device: str, threads: int, **litapi_args):
        super().__init__(**litapi_args)
        self.checkpoint, self.torch_device, self.threads = checkpoint, device, threads

    def setup(self, device):
        self.loaded = load(self.checkpoint, self.torch_device, self.threads)
        self.pre = self.loaded.preprocess

    def decode_request(self, request):
        return decode(request["file"].file.read(), self.pre)  # (C, H, W)

    def batch(self, inputs):
        return torch.stack(inputs).to(self.torch_device)  # (B, C, H, W)

    def predict(self, images):
        return full_model(self.loaded, images)

    def unbatch(self, output):
        return output

    def encode_response(self, output):
        return output
