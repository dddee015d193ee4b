"""Train a GPT-style character-level Transformer with native torch and with tilesmith,
from the same seed, and compare loss curves, step time, tokens/s and peak memory. Then
generate text greedily from both with a KV cache (the decoding path of the attention
kernels: one query against the cached keys), checking tilesmith's tokens against a full
forward at each step, and compare tokens per second.

    python examples/gpt_char.py [--text FILE] [--steps 200] [--seq-len 1024] [--d-model 768]
    python examples/gpt_char.py --fp8 row   # the blocks' Linear layers train in FP8
    torchrun --nproc_per_node=2 examples/gpt_char.py ...   # DistributedDataParallel

The model calls torch.nn.functional.scaled_dot_product_attention itself (as most GPT code
does): tilesmith takes it over with tilesmith.nn.patch_sdpa(), and the Linear layers with
tilesmith.nn.convert(), which fuses the MLP's GELU into its first GEMM. With --fp8 the
blocks' Linear layers become Float8Linear (row-, tensor- or block-wise scaling; the GELU in
their FP8 GEMM's epilogue) and the output head stays a bf16 tilesmith Linear, as FP8
training recipes keep it. Default corpus: the source files of Python's standard library.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import math
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

import tilesmith  # noqa: E402


def stdlib_text(max_chars: int) -> str:
    """Python's own standard library sources, which ship with every Python."""
    root = Path(os.__file__).parent
    parts, total = [], 0
    for path in sorted(root.glob("*.py")):
        text = path.read_text(errors="replace")
        parts.append(text)
        total += len(text)
        if total >= max_chars:
            break
    return "".join(parts)[:max_chars]


class KVCache:
    """One block's keys and values of the tokens seen so far, (batch, heads, tokens, dim)."""

    def __init__(self):
        self.k = self.v = None

    def append(self, k, v):
        """Adds this step's keys and values; returns all of them."""
        self.k = k if self.k is None else torch.cat([self.k, k], dim=2)
        self.v = v if self.v is None else torch.cat([self.v, v], dim=2)
        return self.k, self.v


class Block(torch.nn.Module):
    def __init__(self, d_model, heads):
        super().__init__()
        self.heads = heads
        self.ln1 = torch.nn.LayerNorm(d_model)
        self.qkv = torch.nn.Linear(d_model, 3 * d_model)
        self.proj = torch.nn.Linear(d_model, d_model)
        self.ln2 = torch.nn.LayerNorm(d_model)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(d_model, 4 * d_model), torch.nn.GELU(),
                                       torch.nn.Linear(4 * d_model, d_model))

    def forward(self, x, cache: KVCache | None = None):
        b, t, c = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(c, dim=-1)
        q, k, v = (z.view(b, t, self.heads, c // self.heads).transpose(1, 2) for z in (q, k, v))
        if cache is not None:  # generating: these t tokens follow the cached ones
            if cache.k is not None and t > 1:
                raise ValueError("KVCache: after the prompt, feed one token at a time")
            k, v = cache.append(k, v)
        # Looked up on the module at call time, so patch_sdpa() applies. A sequence (or a
        # prompt) attends causally; one new token attends to every key so far: one query
        # row against the cache, the decoding case of the attention kernels.
        y = F.scaled_dot_product_attention(q, k, v, is_causal=t > 1)
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, c))
        return x + self.mlp(self.ln2(x))


class GPT(torch.nn.Module):
    def __init__(self, vocab, d_model, heads, layers, seq_len):
        super().__init__()
        self.tok = torch.nn.Embedding(vocab, d_model)
        self.pos = torch.nn.Embedding(seq_len, d_model)
        self.blocks = torch.nn.Sequential(*[Block(d_model, heads) for _ in range(layers)])
        self.ln = torch.nn.LayerNorm(d_model)
        self.head = torch.nn.Linear(d_model, vocab, bias=False)
        for p in self.parameters():
            if p.dim() == 2:
                torch.nn.init.normal_(p, std=0.02 / math.sqrt(2 * layers))

    def forward(self, idx):
        positions = torch.arange(idx.shape[1], device=idx.device)
        x = self.blocks(self.tok(idx) + self.pos(positions))
        return self.head(self.ln(x))

    @torch.no_grad()
    def generate(self, prompt, new_tokens: int, *, cache: bool = True):
        """``prompt`` (batch, length) continued greedily by ``new_tokens`` tokens. With
        ``cache``, each step feeds only the newest token, whose query attends to the keys
        and values kept from the steps before; without, each step runs the whole sequence
        again (the same tokens, up to rounding, at quadratic cost)."""
        if prompt.shape[1] + new_tokens > self.pos.num_embeddings:
            raise ValueError(f"generate: {prompt.shape[1]} + {new_tokens} tokens exceed the "
                             f"model's {self.pos.num_embeddings} positions")
        idx, caches = prompt, [KVCache() for _ in self.blocks] if cache else None
        for _ in range(new_tokens):
            start = idx.shape[1] - 1 if caches and caches[0].k is not None else 0
            x = self.tok(idx[:, start:]) + self.pos(
                torch.arange(start, idx.shape[1], device=idx.device))
            for i, block in enumerate(self.blocks):
                x = block(x, caches[i] if caches else None)
            next_token = self.head(self.ln(x[:, -1])).argmax(-1, keepdim=True)
            idx = torch.cat([idx, next_token], dim=1)
        return idx


def batches(data, batch_size, seq_len, device, rank, world, seed):
    generator = torch.Generator().manual_seed(seed * 1000 + rank)
    while True:
        starts = torch.randint(0, len(data) - seq_len - 1, (batch_size,), generator=generator)
        x = torch.stack([data[s:s + seq_len] for s in starts]).to(device)
        y = torch.stack([data[s + 1:s + seq_len + 1] for s in starts]).to(device)
        yield x, y


def compare_generation(native, ours, prompt, new_tokens, *, device, amp, backend, vocab,
                       rank) -> dict:
    """Greedy generation from the trained models: tilesmith's with a KV cache against itself
    without one (the decoding path should pick the tokens the full forward picks), and its
    tokens per second against the native model's, both with a KV cache."""
    native.eval()
    ours.eval()
    with _common.autocast_context(device, amp):
        with tilesmith.nn.patch_sdpa(backend):
            cached = ours.generate(prompt, new_tokens)
            full = ours.generate(prompt, new_tokens, cache=False)
            ours_s = _common.median_seconds(lambda: ours.generate(prompt, new_tokens), device,
                                            repeats=3)
        native_s = _common.median_seconds(lambda: native.generate(prompt, new_tokens), device,
                                          repeats=3)
    generated = slice(prompt.shape[1], None)
    tokens = prompt.shape[0] * new_tokens
    result = {"same_tokens": (cached[:, generated] == full[:, generated]).float().mean().item(),
              "tokens_per_s": tokens / ours_s, "native_tokens_per_s": tokens / native_s,
              "text": "".join(vocab[i] for i in cached[0].tolist())}
    if rank == 0:
        print(f"generation (greedy, {new_tokens} tokens after {prompt.shape[1]}, KV cache): "
              f"tilesmith {result['tokens_per_s']:.0f} tokens/s, native "
              f"{result['native_tokens_per_s']:.0f} ({native_s / ours_s:.2f}x); with and "
              f"without the cache the same token for {result['same_tokens'] * 100:.1f}% of "
              f"the steps\nsample: {result['text'][-200:]!r}")
    return result


def main(argv=None):
    default_device = "cuda" if torch.cuda.is_available() else "cpu"
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--text", type=_common.existing_path,
                        help="a text file (default: Python's stdlib)")
    parser.add_argument("--max-chars", type=_common.positive_int, default=2_000_000)
    parser.add_argument("--steps", type=_common.positive_int, default=200)
    parser.add_argument("--batch-size", type=_common.positive_int, default=8)
    parser.add_argument("--seq-len", type=_common.positive_int, default=1024)
    parser.add_argument("--d-model", type=_common.positive_int, default=768)
    parser.add_argument("--heads", type=_common.positive_int, default=12)
    parser.add_argument("--layers", type=_common.positive_int, default=6)
    parser.add_argument("--lr", type=float, default=6e-4)
    parser.add_argument("--amp", choices=["bfloat16", "float16", "none"],
                        default="bfloat16" if default_device == "cuda" else "none")
    parser.add_argument("--backend", choices=_common.BACKENDS,
                        default="triton" if default_device == "cuda" else "torch",
                        help="tilesmith backend (default: triton on a GPU; torch on the CPU, "
                        "where the Triton interpreter would take minutes per step)")
    parser.add_argument("--fp8", choices=["row", "tensor", "block"], default=None,
                        help="train the blocks' Linear layers as Float8Linear with this "
                        "scaling (the output head stays in bf16)")
    parser.add_argument("--device", default=default_device)
    parser.add_argument("--tolerance", type=float, default=0.01)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.d_model % args.heads:
        parser.error(f"--d-model ({args.d_model}) must be a multiple of --heads ({args.heads})")

    rank, world = _common.setup_distributed(args.device)
    device = f"cuda:{torch.cuda.current_device()}" if args.device == "cuda" else args.device
    text = args.text.read_text(errors="replace") if args.text else stdlib_text(args.max_chars)
    vocab = sorted(set(text))
    index = {ch: i for i, ch in enumerate(vocab)}
    data = torch.tensor([index[ch] for ch in text])
    if rank == 0:
        print(f"corpus: {len(text):,} characters, vocabulary {len(vocab)}")

    torch.manual_seed(args.seed)
    native = GPT(len(vocab), args.d_model, args.heads, args.layers, args.seq_len).to(device)
    # The MLP's GELU runs in its first Linear's GEMM epilogue (fuse_activations).
    ours = copy.deepcopy(native)
    if args.fp8:  # every Linear but the head in FP8; convert below makes the head ours
        _, report = tilesmith.nn.convert(
            ours, include=("linear",), backend=args.backend, fp8=args.fp8,
            module_filter=lambda module, name: name != "head", fuse_activations=True,
            return_report=True)
        if rank == 0:
            print(f"fp8: {len(report.converted)} Linear layers as Float8Linear "
                  f"({args.fp8}-wise scaling; GELUs in their epilogue: {len(report.fused)}), "
                  f"the output head in bf16")
    ours = tilesmith.nn.convert(ours, include=("linear",), backend=args.backend,
                                fuse_activations=True)

    def loss_fn(logits, targets):
        return F.cross_entropy(logits.float().view(-1, logits.shape[-1]), targets.view(-1))

    results = {}
    for label, model in (("native", native), ("tilesmith", ours)):
        model = _common.distributed(model, device, world)
        stream = batches(data, args.batch_size, args.seq_len, device, rank, world, args.seed)
        patch = (tilesmith.nn.patch_sdpa(args.backend) if label == "tilesmith"
                 else contextlib.nullcontext())
        with patch:
            results[label] = _common.train(
                model, stream, loss_fn, steps=args.steps, lr=args.lr, device=device,
                amp=args.amp, label=label, rank=rank,
                items_per_batch=args.batch_size * args.seq_len * world)
    same = _common.report(results["native"], results["tilesmith"], unit="tokens",
                          tolerance=args.tolerance, out_dir=args.out, title="gpt_char",
                          rank=rank)
    prompt_len = min(64, args.seq_len // 2)
    results["generation"] = compare_generation(
        native, ours, data[:prompt_len].view(1, -1).to(device),
        min(128, args.seq_len - prompt_len), device=device, amp=args.amp,
        backend=args.backend, vocab=vocab, rank=rank)
    _common.finish(world)
    return results, same


if __name__ == "__main__":
    main()
