"""examples/word_lm.py: a few training steps on vgkernels' LSTM give torch.nn.LSTM's losses.

Both models start from the same seed: the same initial weights (vgkernels' LSTM draws torch.nn's random
numbers in torch.nn's order) and the same dropout masks. Tolerance: 1e-5 on every step's loss and on the
validation and test losses (float32, a handful of SGD steps at the example's learning rate).
"""

import importlib.util
import math
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def load_example():
    spec = importlib.util.spec_from_file_location("word_lm", ROOT / "examples" / "word_lm.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def word_lm():
    return load_example()


def small_args(word_lm, data, rnn, plot):
    return word_lm.parse_args([
        *(["--data", str(data)] if data else ["--sentences", "300"]), "--rnn", rnn, "--emsize", "24",
        "--nhid", "24", "--nlayers", "2", "--dropout", "0.2", "--tied", "--epochs", "2", "--max-batches", "4",
        "--batch-size", "6", "--eval-batch-size", "4", "--bptt", "9", "--seed", "3", "--plot", plot,
        "--no-progress",
    ])


def write_tiny_corpus(folder: Path, word_lm) -> Path:
    folder.mkdir()
    for split, n, seed in (("train", 300, 0), ("valid", 30, 1), ("test", 30, 2)):
        (folder / f"{split}.txt").write_text("\n".join(word_lm.generated_corpus(n, seed)) + "\n")
    return folder


@pytest.mark.parametrize("from_files", [False, True])
def test_losses_equal_torch_nn(word_lm, tmp_path, from_files):
    data = write_tiny_corpus(tmp_path / "corpus", word_lm) if from_files else None
    plot = tmp_path / "trace.png"
    ours = word_lm.train(small_args(word_lm, data, "vgkernels", str(plot)))
    theirs = word_lm.train(small_args(word_lm, data, "torch", ""))
    assert len(ours["losses"]) == len(theirs["losses"]) == 8
    torch.testing.assert_close(torch.tensor(ours["losses"]), torch.tensor(theirs["losses"]), atol=1e-5,
                               rtol=0)
    torch.testing.assert_close(torch.tensor(ours["valid_losses"]), torch.tensor(theirs["valid_losses"]),
                               atol=1e-5, rtol=0)
    assert ours["test_loss"] == pytest.approx(theirs["test_loss"], abs=1e-5)
    # it learns something, and it is not the chance level of its vocabulary
    vocab = ours["model"].encoder.num_embeddings
    assert ours["losses"][-1] < ours["losses"][0] < math.log(vocab) + 0.5
    # the trace of the last training step: one curve per layer, drawn to a PNG
    trace = ours["model"].rnn.trace
    assert ours["plot"] == plot and plot.stat().st_size > 10_000
    assert isinstance(ours["model"].rnn, torch.nn.LSTM) and theirs["plot"] is None
    assert trace is not None and trace.num_layers == 2


def test_truncated_bptt_detaches_between_steps(word_lm):
    model = word_lm.WordLM(10, 8, 8, 2, 0.0, tied=False)
    hidden = model.init_hidden(3)
    _, hidden = model(torch.randint(10, (4, 3)), hidden)
    assert all(h.requires_grad for h in hidden)
    assert all(h.grad_fn is None and not h.requires_grad for h in word_lm.detach(hidden))


def test_bad_arguments(word_lm, tmp_path):
    with pytest.raises(ValueError, match="--tied: .* --nhid must equal --emsize, got 16 and 8"):
        word_lm.WordLM(10, 8, 16, 1, 0.0, tied=True)
    with pytest.raises(FileNotFoundError, match="--data: expected .*train.txt"):
        word_lm.load_corpus(str(tmp_path), 0)
    with pytest.raises(ValueError, match="batch_size: 50 streams leave fewer than 2 words each"):
        word_lm.batchify(torch.arange(60), 50)
