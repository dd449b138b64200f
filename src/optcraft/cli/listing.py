"""`optcraft list` and `optcraft show NAME`: the registered optimizers, read from the code."""
from __future__ import annotations

from .. import registry
from ..state_codecs import STATE_BITS
from .common import lookup


def add_parsers(subparsers):
    parser = subparsers.add_parser(
        "list", help="every optimizer: chain of blocks, state memory, paper",
        description="Every named optimizer with its chain of building blocks, the bytes of state it "
                    "keeps per parameter at each state_bits (32, 16, 8, 4) and its paper.")
    parser.set_defaults(run=run_list)
    parser = subparsers.add_parser(
        "show", help="one optimizer in full: chain, defaults, state, paper",
        description="One optimizer: its recipe, chain of building blocks, defaults, the "
                    "hyperparameters in its param groups, its state per parameter, its paper and "
                    "the learning rate the commands use.")
    parser.add_argument("name", metavar="NAME", help="an optimizer name (see `optcraft list`)")
    parser.set_defaults(run=run_show)


def chain_text(entry: registry.Entry) -> str:
    chain = " > ".join(entry.chain)
    return f"{entry.wrapper}[{chain}]" if entry.wrapper else chain


def state_text(entry: registry.Entry) -> str:
    if not entry.state_names and not entry.state_bytes:
        return "none"
    names = f" ({', '.join(entry.state_names)})" if entry.state_names else ""
    smaller = ", ".join(f"{bits}-bit {bytes_text(entry, bits)}" for bits in STATE_BITS[1:])
    return f"{bytes_text(entry)}, {entry.state_memory}x parameter-sized{names}; {smaller}"


def bytes_text(entry: registry.Entry, state_bits: int = 32) -> str:
    return f"{entry.state_bytes_at(state_bits):.3g} B"


def _value(v) -> str:
    return repr(v) if isinstance(v, (float, str)) else str(v)


def run_list(args) -> int:
    entries = registry.entries()
    rows = [("name", *(f"{bits}-bit state" for bits in STATE_BITS), "paper", "chain")]
    rows += [(e.name, *(bytes_text(e, bits) for bits in STATE_BITS), e.paper, chain_text(e))
             for e in entries]
    n = len(rows[0]) - 1  # (the chain, last, is not padded)
    widths = [max(len(row[i]) for row in rows) for i in range(n)]
    for i, row in enumerate(rows):
        print("  ".join(f"{cell:<{w}}" for cell, w in zip(row[:n], widths)) + "  " + row[n])
        if i == 0:
            print("  ".join("-" * w for w in widths) + "  " + "-" * 5)
    print(f"\n{len(entries)} optimizers; `optcraft show NAME` for one in full. 32-bit state "
          "... 4-bit state: bytes of state kept per parameter of a float32 1024x1024 weight with "
          "state_bits=32, 16, 8, 4, from the blocks' specifications and the state codecs' "
          "rules (Adam: 8 B; at 8 bits a byte of code per element and a float32 scale per 256).")
    return 0


def run_show(args) -> int:
    entry = lookup(args.name)
    settings = ", ".join(f"{k}={_value(v)}" for k, v in entry.settings.items())
    factory = f"{entry.module or entry.factory.__module__}.{entry.factory.__name__}"
    lines = [
        ("", f"{entry.name}: {entry.summary}" if entry.summary else entry.name),
        ("recipe", factory),
        ("chain" + (f" ({settings})" if settings else ""), chain_text(entry)),
        ("defaults", ", ".join(f"{k}={_value(v)}" for k, v in entry.defaults.items()) or "-"),
        ("hyperparameters", ", ".join(f"{k}={_value(v)}" for k, v in
                                      entry.hyperparameters.items() if k != "lr")),
        ("state/parameter", state_text(entry)),
        ("paper", entry.paper),
        ("commands use", ", ".join([f"lr={entry.lr:g}" + ("" if entry.lr_tuned else
                                                              " (not tuned: the recipe's default)")]
                                   + [f"{k}={_value(v)}" for k, v in entry.settings.items()])),
    ]
    width = max(len(k) for k, _ in lines)
    for key, value in lines:
        print(value if not key else f"  {key + ':':<{width + 1}} {value}")
    return 0
