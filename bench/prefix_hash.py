"""Cost of the prefix cache's block hashes: the old Python `hash()` chain against the SHA-256 chain, on CPU.

Each full KV-cache block is named by a hash chained over its whole prefix (`BlockManager._block_hash`). The old
scheme was `hash((parent, tuple(tokens)))`: fast, but 64 bits and not collision resistant, so a crafted prompt
could be served another user's cached blocks. The new one is SHA-256 over the parent's digest and the block's token
ids as little-endian int64. This times both on the same random token ids (vocabulary 151,936), hashing every full
block of a prompt into a fresh memo, for each `--block-sizes` and `--prompt-lens`: "old" is a copy of the previous
`_block_hash`, "sha256" calls the scheduler's own. Per-block and per-token costs come from the longest prompt.
Each cell is the best of `--repeat` timeit runs (each run loops enough to take >= 0.2 s). Prints a table; `--json`
saves the rows.

    python bench/prefix_hash.py
    python bench/prefix_hash.py --block-sizes 16 32 --prompt-lens 2048 8192 32768 --json prefix_hash.json
"""
import argparse
import random
import timeit
from functools import partial

from benchlib import print_table, write_json
from nanoserve.scheduler import BlockManager, Sequence


def old_block_hash(seq: Sequence, index: int, block_size: int) -> int:
    """The previous `BlockManager._block_hash`, verbatim but for `self.block_size`."""
    while len(seq.block_hashes) <= index:
        i = len(seq.block_hashes)
        parent = seq.block_hashes[-1] if seq.block_hashes else None
        tokens = tuple(seq.token_ids[i * block_size:(i + 1) * block_size])
        seq.block_hashes.append(hash((parent, tokens)))
    return seq.block_hashes[index]


def time_chain(hash_all, seq: Sequence, repeat: int) -> float:
    """Seconds to hash every full block of `seq` from an empty memo, best of `repeat`."""
    def run():
        seq.block_hashes = []
        hash_all()
    timer = timeit.Timer(run)
    number, _ = timer.autorange()  # enough loops for >= 0.2 s
    return min(timer.repeat(repeat=repeat, number=number)) / number


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--block-sizes", type=int, nargs="+", default=[16, 32])
    parser.add_argument("--prompt-lens", type=int, nargs="+", default=[2048, 8192])
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args()

    rng = random.Random(args.seed)
    longest = max(args.prompt_lens)
    tokens = [rng.randrange(151_936) for _ in range(longest)]
    rows = []
    for block_size in args.block_sizes:
        bm = BlockManager(num_blocks=1, block_size=block_size, enable_prefix_caching=True)
        results = {}
        for scheme in ("old", "sha256"):
            us = {}
            for n in args.prompt_lens:
                seq = Sequence(0, tokens[:n], n, None)
                last = n // block_size - 1
                hash_all = (partial(old_block_hash, seq, last, block_size) if scheme == "old"
                            else partial(bm._block_hash, seq, last))
                us[n] = time_chain(hash_all, seq, args.repeat) * 1e6
            results[scheme] = us
            per_block = us[longest] / (longest // block_size)
            rows.append({"block_size": block_size, "scheme": scheme, "us_per_block": per_block,
                         "ns_per_token": per_block * 1e3 / block_size,
                         **{f"us_prompt_{n}": us[n] for n in args.prompt_lens}})
        rows.append({"block_size": block_size, "scheme": "sha256 - old",
                     "us_per_block": rows[-1]["us_per_block"] - rows[-2]["us_per_block"],
                     "ns_per_token": rows[-1]["ns_per_token"] - rows[-2]["ns_per_token"],
                     **{f"us_prompt_{n}": results["sha256"][n] - results["old"][n] for n in args.prompt_lens}})

    header = ["block", "scheme", "µs/block", "ns/token", *[f"µs per {n:,}-token prompt" for n in args.prompt_lens]]
    print_table(header, [[r["block_size"], r["scheme"], r["us_per_block"], r["ns_per_token"],
                          *[r[f"us_prompt_{n}"] for n in args.prompt_lens]] for r in rows],
                title="Prefix-cache block hashes: every full block of a prompt, from an empty memo (best of "
                      f"{args.repeat})")
    write_json(args.json, "prefix_hash", args, rows)


if __name__ == "__main__":
    main()
