"""Step through plain pipeline parallelism, tick by tick, on 3 stages.

    python examples/pipeline_step_through.py [--model DIR|NAME] [--tokens 4]

The stages run in the local runtime, in one process; the script plays the head itself and
advances the world one tick at a time (every busy stage computes one layer per tick), printing
what each stage holds (its current message, layers done, the positions in its KV cache) and what
it sends. Watch the single run move diagonally through the stages while the others idle: the
bubble that speculative strategies fill. At the end the tokens are checked against greedy
decoding.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from minipipe import kernels  # noqa: E402
from minipipe.batch import Batch  # noqa: E402
from minipipe.config import load_config  # noqa: E402
from minipipe.greedy import generate_greedy  # noqa: E402
from minipipe.model import load_stage  # noqa: E402
from minipipe.paths import resolve_model  # noqa: E402
from minipipe.runtime import Chooser, LocalPipeline, load_stage_models, split_layers  # noqa: E402
from minipipe.tokenizer import Tokenizer  # noqa: E402
from minipipe.transport.messages import Result, Run  # noqa: E402


def describe(msg) -> str:
    if isinstance(msg, Run):
        b = msg.batch
        what = "prefill" if b.prefill else "decode"
        rows = f"tokens {list(map(int, b.tokens))} at positions {int(b.positions[0])}..{int(b.positions[-1])}"
        hidden = f", hidden {list(msg.hidden.shape)}" if msg.hidden is not None else ""
        return f"run {msg.run_id} ({what}: {rows}{hidden})"
    if isinstance(msg, Result):
        return f"result of run {msg.run_id}: greedy token {list(map(int, msg.tokens))}"
    return type(msg).__name__


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="checkpoint directory or name (default: the shipped model)")
    parser.add_argument("--tokens", type=int, default=4, help="tokens to generate (default 4)")
    parser.add_argument("--prompt", default="JULIET:\nO Romeo, Romeo! wherefore art thou Romeo?\n\nROMEO:\n")
    args = parser.parse_args()
    model_dir = resolve_model(args.model)
    config = load_config(model_dir)
    tokenizer = Tokenizer(model_dir, config.eos_ids)
    prompt = tokenizer.encode(args.prompt)[: kernels.PREFILL_CHUNK]
    splits = split_layers(config.n_layers, 3)
    # chooser mode with no automatic steps: nothing moves unless this script says `tick`
    pipe = LocalPipeline(load_stage_models(model_dir, splits), chooser=Chooser())
    print(f"model {model_dir.name}: {config.n_layers} layers split over 3 stages as {splits}")
    print(f"prompt {args.prompt!r} -> {prompt}")
    print("each tick, every busy stage computes one layer; '.' is an idle stage\n")
    width = 24
    print("tick  " + "".join(f"{f'stage {i}':<{width}}" for i in range(3)))

    tick, tokens = 0, []
    next_run = Run(pipe.new_run_id(), Batch.chain(prompt, 0, want_logits="last", prefill=True))
    while len(tokens) < args.tokens:
        pipe.submit(next_run)
        print(f"      head -> stage 0: {describe(next_run)}")
        while not pipe.poll():
            tick += 1
            before = [pipe.in_progress(i) for i in range(3)]
            sent = pipe.tick()
            cells = []
            for i in range(3):
                if i not in sent:
                    cells.append(".")
                    continue
                msg, layers_done = before[i]
                if msg is None:  # the stage started a new message in this tick
                    msg = pipe.in_progress(i)[0] or sent[i][0]
                cells.append(f"run {msg.run_id} layer {splits[i][0] + layers_done}")
            print(f"{tick:>4}  " + "".join(f"{c:<{width}}" for c in cells))
            for i, out in sent.items():
                for o in out:
                    dest = "head" if i == 2 else f"stage {i + 1}"
                    print(f"      stage {i} -> {dest}: {describe(o)}")
        answer = pipe.receive()
        token = int(answer.tokens[-1])
        tokens.append(token)
        held = ", ".join(f"stage {i}: 0..{max(s.cache.positions(0))}" for i, s in enumerate(pipe.stages))
        print(f"      head commits token {token} {tokenizer.decode([token])!r}; KV caches hold positions {held}\n")
        next_run = Run(pipe.new_run_id(), Batch.chain([token], len(prompt) + len(tokens) - 1))
    expected = generate_greedy(load_stage(model_dir), prompt, args.tokens).tokens
    print(f"generated {tokens} = {tokenizer.decode(tokens)!r}")
    print(f"same as greedy decoding: {tokens == expected}")
    sys.exit(0 if tokens == expected else 1)


if __name__ == "__main__":
    main()
