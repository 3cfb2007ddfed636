"""What the CLI tells a user while it works: progress lines when output is a file, and prompt words the model cannot read."""

from __future__ import annotations

import re
import subprocess
import sys
from types import SimpleNamespace

import pytest
from lightning.pytorch.callbacks import TQDMProgressBar
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from conftest import STAGE_STEPS, TINY_OVERRIDES
from unizoo.cli import main
from unizoo.data.captions import vocabulary
from unizoo.data.datamodule import ShapesDataModule
from unizoo.runtime import progress
from unizoo.runtime.progress import PlainProgress, batch_size, duration
from unizoo.text import word_level_tokenizer
from unizoo.text.unknown_words import unknown_words

STEPS = 4
EVALUATION_PROMPTS = 4
MISSING = "yellow"  # dropped from the tokenizer's vocabulary, so some evaluation prompts hold an unknown word


@pytest.fixture(scope="module")
def run_to_a_file(tmp_path_factory):
    """`unizoo train ... > out.log 2> err.log` at tiny size, with the progress bar left to unizoo's own choice."""
    root = tmp_path_factory.mktemp("runs")
    words = ",".join(word for word in vocabulary() if word != MISSING)
    overrides = [
        *(o for o in TINY_OVERRIDES if "enable_progress_bar" not in o),
        *STAGE_STEPS["generation"],
        f"evaluation.prompts={EVALUATION_PROMPTS}",
        "progress_interval=0",  # a line after every step
        "~backbone.tokenizer.vocabulary",
        f"+backbone.tokenizer.vocabulary=[{words}]",
        f"run_root={root}",
    ]
    out, err = root / "out.log", root / "err.log"
    with out.open("w") as stdout, err.open("w") as stderr:
        process = subprocess.run([sys.executable, "-m", "unizoo.cli", "train", *overrides], stdout=stdout,
                                 stderr=stderr, timeout=600, check=False)
    assert process.returncode == 0, err.read_text()[-4000:]
    (run_dir,) = (root / "default").iterdir()
    return run_dir, out.read_text(), err.read_text()


def test_progress_lines_go_where_the_bar_would_be_and_to_train_log(run_to_a_file):
    run_dir, stdout, stderr = run_to_a_file
    assert stdout.splitlines()[-1] == str(run_dir)  # the run directory stays the last line of stdout
    assert "step 1/" not in stderr
    for text in (stdout, (run_dir / "train.log").read_text()):
        lines = re.findall(r"generation: step (\d+)/(\d+) \((\d+)%\), loss ([\d.]+), generation ([\d.]+), ([\d.]+) images/s(.*)", text)
        assert [int(step) for step, *_ in lines] == [*range(1, STEPS + 1), STEPS]  # every step, then the stage's end
        assert {int(total) for _, total, *_ in lines} == {STEPS}
        assert all(float(images) > 0 for *_, images, _ in lines)
        assert all(re.fullmatch(r", \d+s left", rest) for *_, rest in lines[: STEPS - 1])
        assert re.fullmatch(r", done in \d+s", lines[-1][-1])
    assert "Epoch 0" not in stdout + stderr  # Lightning's bar is off: its carriage-return redraws would fill the file


def test_the_log_says_the_generator_trains_eager_on_the_cpu_and_why(run_to_a_file):
    run_dir, _, stderr = run_to_a_file
    line = ("[unizoo] compile: auto -> eager for stage generation (cpu: compiling the default generator and language model "
            "took 81 s on a 2-core CPU and pays back after about 2,400 steps (the default stage has 1,500); compile=true "
            "compiles anyway)")
    assert line in stderr.splitlines()
    assert line.removeprefix("[unizoo] ") in (run_dir / "train.log").read_text()


def test_the_log_holds_no_library_chatter(run_to_a_file):
    _, stdout, stderr = run_to_a_file
    # Lightning logs "`weights_only` was not set, defaulting to `False`." for a save that does not say
    # what it keeps; the stage's checkpoint says (the whole state).
    assert "weights_only" not in stdout + stderr
    # Lightning's advertisement for its hosted logger, at every stage.
    assert "Tip" not in stdout + stderr and "litlogger" not in stdout + stderr
    # torch's deprecation of the LeafSpec class that Lightning 2.6 still builds, at every stage.
    assert "LeafSpec" not in stdout + stderr
    assert "GPU available" in stderr  # Lightning's own information stays


def test_evaluation_warns_once_per_prompt_with_an_unknown_word(run_to_a_file):
    run_dir, _, stderr = run_to_a_file
    datamodule = ShapesDataModule(val_size=64)
    datamodule.setup("validate")
    prompts = [p for p in dict.fromkeys(datamodule.prompts("val", EVALUATION_PROMPTS)) if MISSING in p.split()]
    assert prompts  # the test means something only if some prompt holds the word
    log = (run_dir / "train.log").read_text()
    warnings = re.findall(r"prompt '([^']+)': 'yellow' is not in the tokenizer's vocabulary", log)
    # Evaluated twice (untrained, after the stage), warned once per distinct prompt.
    assert warnings == prompts
    assert f"{run_dir}/tokenizer/tokenizer.json" in log
    assert len(re.findall("'yellow' is not in", stderr)) == len(prompts)  # on the console too


def test_sample_warns_about_words_the_model_cannot_read(run_to_a_file, tmp_path, capsys):
    run_dir, *_ = run_to_a_file
    assert main(["sample", str(run_dir), "--prompt", "a purple hexagon", "--n", "2", "--steps", "1", "--out", str(tmp_path)]) == 0
    err = capsys.readouterr().err
    # Every main() in one process adds a console handler (cli._setup_logging), so handlers of earlier
    # tests may repeat the line here, or report that their capture stream is closed.
    warnings = [line for line in err.splitlines() if line.startswith("[unizoo] prompt")]
    assert warnings
    for warning in warnings:
        assert "prompt 'a purple hexagon': 'purple', 'hexagon' are not in the tokenizer's vocabulary" in warning
        assert "<unk>" in warning and f"{run_dir}/tokenizer/tokenizer.json" in warning and "unizoo recipe" in warning
    assert (tmp_path / "grid.png").is_file()  # a warning, not a refusal


def test_sample_with_known_words_says_nothing(run_to_a_file, tmp_path, capsys):
    run_dir, *_ = run_to_a_file
    assert main(["sample", str(run_dir), "--prompt", "two red circles", "--n", "1", "--steps", "1", "--out", str(tmp_path)]) == 0
    assert "vocabulary" not in capsys.readouterr().err


def test_unknown_words_are_the_pieces_mapped_to_the_unknown_token():
    tokenizer = word_level_tokenizer(vocabulary())
    assert unknown_words(tokenizer, "a Purple hexagon above a purple circle") == ["Purple", "hexagon", "purple"]
    assert unknown_words(tokenizer, "two red circles") == []
    # A byte-level tokenizer has no unknown token: it spells any word.
    byte_level = Tokenizer(models.BPE())
    byte_level.pre_tokenizer = pre_tokenizers.ByteLevel()
    assert unknown_words(PreTrainedTokenizerFast(tokenizer_object=byte_level), "a purple hexagon") == []


@pytest.mark.parametrize(("stdout", "stderr", "active", "bar"), [
    (True, True, False, True),  # a terminal: Lightning's bar, no lines
    (True, False, False, True),  # unizoo train 2> log: the bar is on the terminal still
    (False, True, True, False),  # unizoo train > log: lines in the file, no bar redraws there
    (False, False, True, False),  # nohup, CI, SLURM
])
def test_lines_replace_the_bar_only_off_a_terminal(monkeypatch, stdout, stderr, active, bar):
    monkeypatch.setattr(progress, "is_terminal", lambda stream: {sys.stdout: stdout, sys.stderr: stderr}[stream])
    trainer = SimpleNamespace(progress_bar_callback=TQDMProgressBar(), is_global_zero=True)
    callback = PlainProgress("generation", interval=30)
    callback.setup(trainer, None, "fit")
    assert callback.active is active
    assert trainer.progress_bar_callback.is_enabled is bar
    callback.teardown(trainer, None, "fit")


def test_progress_helpers():
    import torch

    assert batch_size({"image": torch.zeros(8, 3, 4, 4), "caption": ["a"] * 8}) == 8
    assert batch_size([["a", "b"], torch.zeros(5, 2)]) == 5
    assert [duration(s) for s in (4, 135, 4000)] == ["4s", "2m15s", "1h06m"]
    with pytest.raises(ValueError, match="progress_interval"):
        PlainProgress("generation", interval=-1)
