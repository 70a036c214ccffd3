"""A word-level language model with a multi-layer vgkernels LSTM, trained by truncated BPTT.

Embedding -> LSTM (num_layers, dropout between layers) -> dropout -> linear decoder (optionally tied to
the embedding), next-word cross-entropy. The corpus is cut into batch_size streams; each step trains on
bptt consecutive words and carries the LSTM's state into the next step with its history detached. The
LSTM runs with ``track=True``: after training, the BPTT trace of the last step (the gradient norm that
reached every position and layer) is saved as a PNG and summarised.

Run it as ``python examples/word_lm.py`` (a small generated corpus, a few minutes on a laptop CPU), or
on a real corpus with ``--data DIR`` holding train.txt, valid.txt and test.txt (one sentence per line,
words separated by spaces, as in the WikiText-2 word-level files). ``--rnn torch`` trains the same model
with torch.nn.LSTM: under the same seed it follows the same trajectory.
"""

from __future__ import annotations

import argparse
import math
import random
import sys
import time
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

import vgkernels as vgk

EOS = "<eos>"


class Vocabulary:
    """Word <-> id, in order of first appearance."""

    def __init__(self) -> None:
        self.ids: dict[str, int] = {}
        self.words: list[str] = []

    def add(self, word: str) -> int:
        if word not in self.ids:
            self.ids[word] = len(self.words)
            self.words.append(word)
        return self.ids[word]

    def __len__(self) -> int:
        return len(self.words)


def encode(lines: list[str], vocab: Vocabulary) -> torch.Tensor:
    """int64 [words] of the lines' words, each line ended by <eos>; new words join the vocabulary."""
    return torch.tensor([vocab.add(w) for line in lines for w in line.split() + [EOS]], dtype=torch.int64)


def generated_corpus(sentences: int, seed: int = 0) -> list[str]:
    """Sentences of a small English-like grammar with agreement across a relative clause (so that the
    model has something to carry over several words)."""
    rng = random.Random(seed)
    nouns = {"singular": ["cat", "dog", "bird", "teacher", "farmer", "child", "river", "engine"],
             "plural": ["cats", "dogs", "birds", "teachers", "farmers", "children", "rivers", "engines"]}
    verbs = {"singular": ["sees", "likes", "follows", "hears", "finds"],
             "plural": ["see", "like", "follow", "hear", "find"]}
    rest = {"singular": ["is", "was", "sleeps", "runs"], "plural": ["are", "were", "sleep", "run"]}
    adjectives = ["old", "small", "quiet", "green", "happy", "slow"]
    adverbs = ["today", "again", "at night", "near the house", "in the rain"]

    def noun_phrase(number: str) -> str:
        adjective = [rng.choice(adjectives)] if rng.random() < 0.4 else []
        return " ".join(["the", *adjective, rng.choice(nouns[number])])

    out = []
    for _ in range(sentences):
        number = rng.choice(["singular", "plural"])
        subject = noun_phrase(number)
        if rng.random() < 0.5:  # a relative clause between subject and verb
            other = rng.choice(["singular", "plural"])
            subject += f" that {noun_phrase(other)} {rng.choice(verbs[other])}"
        if rng.random() < 0.5:
            predicate = f"{rng.choice(verbs[number])} {noun_phrase(rng.choice(['singular', 'plural']))}"
        else:
            predicate = rng.choice(rest[number])
        tail = f" {rng.choice(adverbs)}" if rng.random() < 0.3 else ""
        out.append(f"{subject} {predicate}{tail} .")
    return out


def load_corpus(data: str | None, seed: int,
                sentences: int = 4000) -> tuple[Vocabulary, dict[str, torch.Tensor]]:
    """The train/valid/test word ids of ``data`` (a folder with train.txt, valid.txt, test.txt), or of a
    generated corpus of ``sentences`` training sentences (and a tenth of that for each of valid and test)
    when ``data`` is None."""
    vocab = Vocabulary()
    vocab.add(EOS)
    if data is None:
        lines = {split: generated_corpus(n, seed + k) for k, (split, n) in
                 enumerate((("train", sentences), ("valid", sentences // 10), ("test", sentences // 10)))}
    else:
        folder = Path(data)
        lines = {}
        for split in ("train", "valid", "test"):
            path = folder / f"{split}.txt"
            if not path.is_file():
                raise FileNotFoundError(f"--data: expected {path} (train.txt, valid.txt and test.txt in "
                                        f"{folder})")
            lines[split] = [ln for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    return vocab, {split: encode(text, vocab) for split, text in lines.items()}


def batchify(ids: torch.Tensor, batch_size: int) -> torch.Tensor:
    """[words] -> [steps, batch_size]: batch_size contiguous streams side by side (the tail is dropped)."""
    steps = ids.numel() // batch_size
    if steps < 2:
        raise ValueError(f"batch_size: {batch_size} streams leave fewer than 2 words each ({ids.numel()} "
                         "words)")
    return ids[: steps * batch_size].view(batch_size, steps).t().contiguous()


def chunk(source: torch.Tensor, i: int, bptt: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs [T, B] from step i and their next words, flattened [T * B]."""
    T = min(bptt, source.shape[0] - 1 - i)
    return source[i: i + T], source[i + 1: i + 1 + T].reshape(-1)


class WordLM(nn.Module):
    """Embedding -> LSTM -> decoder; ``rnn`` is "vgkernels" (traced BPTT) or "torch" (torch.nn.LSTM)."""

    def __init__(self, vocab_size: int, emsize: int, nhid: int, nlayers: int, dropout: float, tied: bool,
                 rnn: str = "vgkernels") -> None:
        super().__init__()
        if tied and emsize != nhid:
            raise ValueError(f"--tied: the decoder shares the embedding, so --nhid must equal --emsize, got "
                             f"{nhid} and {emsize}")
        self.drop = nn.Dropout(dropout)
        self.encoder = nn.Embedding(vocab_size, emsize)
        if rnn == "vgkernels":
            self.rnn = vgk.nn.LSTM(emsize, nhid, nlayers, dropout=dropout, track=True)
        elif rnn == "torch":
            self.rnn = nn.LSTM(emsize, nhid, nlayers, dropout=dropout)
        else:
            raise ValueError(f"--rnn: expected 'vgkernels' or 'torch', got {rnn!r}")
        self.decoder = nn.Linear(nhid, vocab_size)
        if tied:
            self.decoder.weight = self.encoder.weight
        # pytorch/examples' initialization of the embedding and decoder
        nn.init.uniform_(self.encoder.weight, -0.1, 0.1)
        nn.init.zeros_(self.decoder.bias)
        if not tied:
            nn.init.uniform_(self.decoder.weight, -0.1, 0.1)
        self.nlayers, self.nhid = nlayers, nhid

    def init_hidden(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        zeros = self.encoder.weight.new_zeros(self.nlayers, batch_size, self.nhid)
        return zeros, zeros.clone()

    def forward(self, x: torch.Tensor, hidden: tuple[torch.Tensor, torch.Tensor]):
        """x: int64 [T, B]. Returns the logits [T * B, vocab] and the new hidden state."""
        output, hidden = self.rnn(self.drop(self.encoder(x)), hidden)
        return self.decoder(self.drop(output)).flatten(0, 1), hidden


def detach(hidden: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """Keep the state, cut its history: truncated BPTT."""
    return tuple(h.detach() for h in hidden)


def evaluate(model: WordLM, source: torch.Tensor, bptt: int) -> float:
    """Mean cross-entropy per word over ``source`` [steps, B]."""
    model.eval()
    total, count = 0.0, 0
    hidden = model.init_hidden(source.shape[1])
    with torch.no_grad():
        for i in range(0, source.shape[0] - 1, bptt):
            x, y = chunk(source, i, bptt)
            logits, hidden = model(x, hidden)
            total += nn.functional.cross_entropy(logits, y, reduction="sum").item()
            count += y.numel()
    return total / count


def train(args: argparse.Namespace) -> dict[str, object]:
    """Train for ``args.epochs`` epochs (at most ``args.max_batches`` steps each, if set).

    Returns the training losses per step, the validation loss per epoch, the test loss, the model, and
    the path of the trace plot (None with ``--rnn torch`` or ``--no-plot``).
    """
    torch.manual_seed(args.seed)
    vocab, ids = load_corpus(args.data, args.seed, args.sentences)
    train_data = batchify(ids["train"], args.batch_size)
    valid_data = batchify(ids["valid"], args.eval_batch_size)
    test_data = batchify(ids["test"], args.eval_batch_size)
    model = WordLM(len(vocab), args.emsize, args.nhid, args.nlayers, args.dropout, args.tied, args.rnn)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr)
    losses, valid_losses = [], []
    best = math.inf
    for epoch in range(1, args.epochs + 1):
        model.train()
        hidden = model.init_hidden(args.batch_size)
        starts = list(range(0, train_data.shape[0] - 1, args.bptt))[: args.max_batches]
        bar = tqdm(starts, desc=f"epoch {epoch}", unit="batch", disable=not args.progress, leave=False)
        for i in bar:
            x, y = chunk(train_data, i, args.bptt)
            hidden = detach(hidden)
            optimizer.zero_grad()
            logits, hidden = model(x, hidden)
            loss = nn.functional.cross_entropy(logits, y)
            loss.backward()
            vgk.clip_grad_norm_(model.parameters(), args.clip)
            optimizer.step()
            losses.append(loss.item())
            bar.set_postfix(loss=f"{losses[-1]:.3f}", ppl=f"{math.exp(min(losses[-1], 50)):.1f}")
        trace = getattr(model.rnn, "trace", None)  # of the last training step (evaluation traces anew)
        valid_losses.append(evaluate(model, valid_data, args.bptt))
        print(f"epoch {epoch}: train loss {sum(losses[-len(starts):]) / len(starts):.3f}, valid loss "
              f"{valid_losses[-1]:.3f} (ppl {math.exp(valid_losses[-1]):.1f})")
        if valid_losses[-1] < best:
            best = valid_losses[-1]
        else:  # pytorch/examples' schedule: divide the learning rate when validation stalls
            for group in optimizer.param_groups:
                group["lr"] /= 4.0
    test_loss = evaluate(model, test_data, args.bptt)
    print(f"test loss {test_loss:.3f} (ppl {math.exp(test_loss):.1f})")
    plot = None
    if trace is not None and trace.grad_norm is not None:
        print(vgk.diagnostics.trace_report(trace, name=f"LSTM, last training step (T={trace.seq_len})"))
        if args.plot:
            Path(args.plot).parent.mkdir(parents=True, exist_ok=True)
            plot = vgk.diagnostics.plot_trace({"LSTM": trace}, args.plot,
                                              title="Word LM: gradient norm per position, last training step")
            print(f"trace plot: {plot}")
    return {"losses": losses, "valid_losses": valid_losses, "test_loss": test_loss, "model": model,
            "plot": plot}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", default=None, help="folder with train.txt, valid.txt, test.txt (default: a "
                                               "generated corpus)")
    p.add_argument("--sentences", type=int, default=4000, help="training sentences of the generated corpus")
    p.add_argument("--rnn", default="vgkernels", choices=["vgkernels", "torch"], help="LSTM implementation")
    p.add_argument("--emsize", type=int, default=128, help="word embedding size")
    p.add_argument("--nhid", type=int, default=128, help="LSTM hidden size")
    p.add_argument("--nlayers", type=int, default=2, help="LSTM layers")
    p.add_argument("--dropout", type=float, default=0.2,
                   help="dropout on the embeddings, between the layers and on the output")
    p.add_argument("--tied", action="store_true",
                   help="tie the decoder to the embedding (needs nhid == emsize)")
    p.add_argument("--lr", type=float, default=20.0, help="initial learning rate (plain SGD)")
    p.add_argument("--clip", type=float, default=0.25, help="gradient norm clipping")
    p.add_argument("--epochs", type=int, default=3, help="epochs")
    p.add_argument("--batch-size", type=int, default=20, help="training streams")
    p.add_argument("--eval-batch-size", type=int, default=10, help="evaluation streams")
    p.add_argument("--bptt", type=int, default=35, help="truncated BPTT length")
    p.add_argument("--max-batches", type=int, default=None, help="at most this many steps per epoch")
    p.add_argument("--seed", type=int, default=1111, help="random seed")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--plot", default="word_lm_trace.png",
                   help="PNG of the last step's BPTT trace ('' for none)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    train(args)
    print(f"done in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
