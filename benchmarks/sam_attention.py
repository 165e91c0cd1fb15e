"""SAM's ViT attention alone, forward + backward, in each form the platform can run it.

At RSRefSeg sizes SAM's image encoder is most of a step, and its attention carries a decomposed
relative-position bias that keeps PyTorch's fastest attention kernels out of reach. This times one
attention layer at a global block's shape (64x64 tokens) and a windowed block's (14x14 windows),
with LoRA-style trainable q (the input requires grad, so backward runs through everything):

  * `segment-anything`: the original code (scores materialised, bias added, softmax);
  * `sdpa+bias`: `model.sdpa_attention` (the bias as SDPA's attn_mask);
  * `sdpa folded`: `model.fold_rel_pos` (the bias folded into q/k, no attn_mask);
  * `sdpa folded, v padded`: as above with v zero-padded to q/k's width, which flash attention
    requires (measured here to decide whether the padding pays for its extra FLOPs).

    python benchmarks/sam_attention.py                    # ViT-B sizes, batch 8, bf16 on GPU
    python benchmarks/sam_attention.py --dim 1024 --heads 16 --batch 4
"""

from __future__ import annotations

import argparse
import time
import types

import torch
import torch.nn.functional as F
from segment_anything.modeling.image_encoder import Attention

from rsrefseg.models.fast_attention import (
    _sdpa_folded_forward, _sdpa_forward, folded_rel_pos_qk, merge_heads, split_heads,
)


def _folded_padded_v_forward(self: Attention, x: torch.Tensor) -> torch.Tensor:
    _, h, w, _ = x.shape
    q, k, v = split_heads(self, x)
    q, k = folded_rel_pos_qk(q, k, self.rel_pos_h, self.rel_pos_w, (h, w), self.scale)
    c = v.shape[-1]
    out = F.scaled_dot_product_attention(q, k, F.pad(v, (0, q.shape[-1] - c)), scale=1.0)[..., :c]
    return merge_heads(self, out, (h, w))


def _twin(layer: Attention, forward) -> Attention:
    """A copy of `layer` (same weights) whose forward is `forward`."""
    size = (layer.rel_pos_h.shape[0] // 2 + 1, layer.rel_pos_w.shape[0] // 2 + 1)
    twin = Attention(layer.qkv.in_features, layer.num_heads, use_rel_pos=True, input_size=size)
    twin.load_state_dict(layer.state_dict())
    twin.forward = types.MethodType(forward, twin)
    return twin


def variants(layer: Attention) -> dict[str, Attention]:
    return {
        "segment-anything": layer,
        "sdpa+bias": _twin(layer, _sdpa_forward),
        "sdpa folded": _twin(layer, _sdpa_folded_forward),  # what use_sdpa_attention(fold_rel_pos=True) installs
        "sdpa folded, v padded": _twin(layer, _folded_padded_v_forward),
    }


def time_fwd_bwd(layer: Attention, x: torch.Tensor, reps: int) -> float:
    def once():
        xi = x.detach().requires_grad_(True)
        layer(xi).float().square().mean().backward()

    for _ in range(3):
        once()
    if x.is_cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        once()
    if x.is_cuda:
        torch.cuda.synchronize()
    return 1000 * (time.perf_counter() - t0) / reps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--reps", type=int, default=10)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    print(f"# SAM attention fwd+bwd, dim {args.dim}, {args.heads} heads, {dtype}, "
          f"{torch.cuda.get_device_name() if device.type == 'cuda' else 'CPU'}, torch {torch.__version__}")
    print("| block | tokens x batch | form | ms | vs segment-anything | max abs diff |\n|---|---|---|---|---|---|")
    # A global block sees the whole 64x64 grid; a windowed block sees 25 windows of 14x14 per image.
    for block, size, batch in (("global", 64, args.batch), ("window", 14, args.batch * 25)):
        torch.manual_seed(0)
        layer = Attention(args.dim, args.heads, use_rel_pos=True, input_size=(size, size))
        with torch.no_grad():
            layer.rel_pos_h.normal_(std=0.02)
            layer.rel_pos_w.normal_(std=0.02)
        forms = {name: m.to(device, dtype) for name, m in variants(layer).items()}
        x = torch.randn(batch, size, size, args.dim, device=device, dtype=dtype)
        with torch.no_grad():
            ref = forms["segment-anything"](x).float()
        base = None
        for name, m in forms.items():
            try:
                ms = time_fwd_bwd(m, x, args.reps)
            except torch.cuda.OutOfMemoryError:
                print(f"| {block} | {size}x{size} x {batch} | {name} | OOM | - | - |")
                torch.cuda.empty_cache()
                continue
            base = base or ms
            with torch.no_grad():
                diff = (m(x).float() - ref).abs().max().item()
            print(f"| {block} | {size}x{size} x {batch} | {name} | {ms:.2f} | {base / ms:.2f}x | {diff:.2e} |", flush=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
