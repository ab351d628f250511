"""Core contracts: label mapping, strategy sizes, submission order and format, metrics, evaluate's id check."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.metrics import accuracy_score, f1_score, precision_recall_fscore_support
from sklearn.preprocessing import LabelEncoder

from lowres_birds.cli import main
from lowres_birds.config import HR_SIZE, LR_SIZE, parse_strategy
from lowres_birds.data.tables import LabelMap
from lowres_birds.metrics import per_class_table, score
from lowres_birds.model.factory import create_model
from lowres_birds.model.resolution import gather_nchw, normalise, to_nchw
from lowres_birds.run_dir import RunDir

# --------------------------------------------------------------------------- labels

LABELS = [
    "Slate Shrike",
    "azure finch",
    "Azure Finch",
    "까치",
    "001.Black_footed_Albatross",
    "Heron, Great",
    "Slate Shrike",
]


def test_label_map_matches_sklearn_label_encoder():
    encoder = LabelEncoder().fit(LABELS)
    label_map = LabelMap.fit(LABELS)
    assert list(label_map.classes) == encoder.classes_.tolist()
    np.testing.assert_array_equal(label_map.encode(LABELS), encoder.transform(LABELS))
    assert label_map.decode([4, 0, 2]) == encoder.inverse_transform([4, 0, 2]).tolist()


def test_label_map_round_trips_through_labels_json(tmp_path):
    label_map = LabelMap.fit(LABELS)
    RunDir(tmp_path).write_labels(list(label_map.classes))
    assert LabelMap(tuple(RunDir(tmp_path).labels())) == label_map


# --------------------------------------------------------------------------- strategies

STRATEGIES = {
    "native": ("native", 64, "lr"),
    "upscale": ("upscale", 224, "lr"),
    "upscale:128": ("upscale", 128, "lr"),
    " upscale:96 ": ("upscale", 96, "lr"),
    "hr-downscale": ("hr-downscale", 64, "hr"),
    "hr-downscale:32": ("hr-downscale", 32, "hr"),
}


@pytest.mark.parametrize("text", STRATEGIES)
def test_strategy_fixes_the_input_size_and_the_training_source(text):
    strategy = parse_strategy(text)
    assert (strategy.kind, strategy.input_size, strategy.train_source) == STRATEGIES[text]
    assert parse_strategy(str(strategy)) == strategy  # the saved config text parses back to the same strategy


@pytest.mark.parametrize("text", ["upscale:96", "hr-downscale:32", "native"])
def test_model_sees_the_strategy_size_in_training_and_prediction(text):
    """Training feeds the stored images (256x256 twins for hr-downscale), prediction feeds 64x64: same model input."""
    strategy = parse_strategy(text)
    model = create_model("timm:test_efficientnet", ["a", "b", "c"], strategy.input_size, pretrained=False).eval()
    train_side = HR_SIZE if strategy.train_source == "hr" else LR_SIZE
    for stored in (train_side, LR_SIZE):
        images = torch.randint(0, 256, (2, 3, stored, stored), dtype=torch.uint8)
        assert model.preprocess(images).shape == (2, 3, strategy.input_size, strategy.input_size)
        with torch.no_grad():
            assert model(images).shape == (2, 3)


def test_normalise_follows_its_definition_in_both_layouts_with_a_fresh_batch_each_call():
    """The channels_last fast path (one float buffer, transformed in place) and the plain path agree."""
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    channels_last = torch.randint(0, 256, (3, 40, 24, 3), dtype=torch.uint8).permute(0, 3, 1, 2)
    expected = (channels_last.float() / 255 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    for images in (channels_last, channels_last.contiguous()):
        pixels = normalise(images, mean, std)
        assert pixels.dtype == torch.float32
        assert pixels.is_contiguous(memory_format=torch.channels_last) == (images is channels_last)
        torch.testing.assert_close(pixels, expected)
    first = normalise(channels_last, mean, std)
    normalise(channels_last.flip(-1), mean, std)  # a later batch must not overwrite an earlier one
    torch.testing.assert_close(first, expected)


def test_gathered_batches_are_writable_copies_of_the_memory_mapped_cache(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (5, 8, 8, 3), dtype=np.uint8)
    np.save(tmp_path / "cache.npy", images)
    cache = np.load(tmp_path / "cache.npy", mmap_mode="r")
    batch = gather_nchw(cache, np.array([3, 0, 3]))
    assert torch.equal(batch, to_nchw(images[[3, 0, 3]]))
    batch.zero_()  # writable, and a copy: the cache is untouched
    assert np.array_equal(np.load(tmp_path / "cache.npy"), images)


@pytest.mark.parametrize("text", ["native:64", "upscale:8", "upscale:2000", "upscale:x", "downscale:64", ""])
def test_bad_strategies_are_refused(text, capsys):
    assert main(["train", "--data", ".", "--strategy", text]) == 2
    assert capsys.readouterr().err.count("\n") == 1


# --------------------------------------------------------------------------- submission


def test_submission_follows_sample_submission_order_and_format(trained_run, demo_data, tmp_path):
    data = Path(shutil.copytree(demo_data, tmp_path / "data"))
    sample = pd.read_csv(data / "sample_submission.csv", dtype=str)
    shuffled = sample.sample(frac=1.0, random_state=1)
    assert shuffled["id"].tolist() != sample["id"].tolist()
    shuffled.to_csv(data / "sample_submission.csv", index=False)
    out = tmp_path / "submission.csv"
    assert main(["predict", "--run", str(trained_run), "--data", str(data), "--out", str(out)]) == 0
    lines = out.read_text(encoding="utf-8").split("\n")
    assert lines[0] == "id,label" and lines[-1] == "" and len(lines) == len(sample) + 2
    written = pd.read_csv(out, dtype=str)
    assert written["id"].tolist() == shuffled["id"].tolist()
    classes = RunDir(trained_run).labels()
    assert set(written["label"]) <= set(classes)


# --------------------------------------------------------------------------- metrics


def test_macro_f1_by_hand_and_by_sklearn():
    truth, predicted = ["a", "a", "b", "c"], ["a", "b", "b", "b"]
    # F1 per class: a = 2/3 (P 1, R 1/2), b = 1/2 (P 1/3, R 1), c = 0; macro = 7/18.
    assert score(truth, predicted) == pytest.approx({"macro_f1": 7 / 18, "accuracy": 0.5})
    rng = np.random.default_rng(0)
    truth, predicted = rng.integers(0, 7, 300), rng.integers(0, 9, 300)  # predictions include absent classes
    assert score(truth, predicted) == pytest.approx(
        {"macro_f1": f1_score(truth, predicted, average="macro"), "accuracy": accuracy_score(truth, predicted)}
    )


def test_per_class_table_matches_sklearn():
    truth, predicted = ["a", "a", "b", "c", "c"], ["a", "c", "b", "c", "b"]
    table = per_class_table(truth, predicted, ["a", "b", "c"])
    precision, recall, f1, support = precision_recall_fscore_support(truth, predicted, labels=["a", "b", "c"])
    np.testing.assert_allclose(table[["precision", "recall", "f1"]].to_numpy().T, [precision, recall, f1])
    assert table["support"].tolist() == support.tolist()


def test_training_evaluate_scores_every_image_like_sklearn():
    from lowres_birds.train.validation import evaluate

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (37, 8, 8, 3), dtype=np.uint8)
    labels = rng.integers(0, 4, 37)

    class MeanColour(torch.nn.Module):
        """Logits from each image's mean colour: deterministic and different per image."""

        def forward(self, batch):
            colour = batch.float().mean((2, 3))
            return torch.cat([colour, colour.sum(1, keepdim=True) / 3], 1)

    result, probs = evaluate(MeanColour(), images, labels, torch.device("cpu"))
    assert probs.shape == (37, 4)
    assert result == pytest.approx(score(labels, probs.argmax(1)))
    assert result["macro_f1"] == pytest.approx(f1_score(labels, probs.argmax(1), average="macro"))


# --------------------------------------------------------------------------- evaluate


def test_evaluate_refuses_mismatched_ids_saying_how_many(demo_data, tmp_path, capsys):
    truth = pd.read_csv(demo_data / "test_labels.csv", dtype=str)
    broken = pd.concat([truth.iloc[2:], pd.DataFrame({"id": ["NOT_A_TEST_ID"], "label": [truth["label"][0]]})])
    broken.to_csv(tmp_path / "submission.csv", index=False)
    args = [
        "evaluate",
        "--submission",
        str(tmp_path / "submission.csv"),
        "--labels",
        str(demo_data / "test_labels.csv"),
    ]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "submission.csv: ids do not match test_labels.csv: 2 missing, 1 extra" in err
    assert not (tmp_path / "per_class.csv").exists()


def test_evaluate_accepts_partial_labels_but_not_ids_outside_the_test_set(demo_data, tmp_path, capsys):
    """Labels for half of the test set score the labelled half; a submission id outside test.csv is refused."""
    truth = pd.read_csv(demo_data / "test_labels.csv", dtype=str)
    truth.iloc[::2].to_csv(tmp_path / "half.csv", index=False)
    truth.to_csv(tmp_path / "submission.csv", index=False)
    args = [
        "evaluate",
        "--submission",
        str(tmp_path / "submission.csv"),
        "--labels",
        str(tmp_path / "half.csv"),
        "--data",
        str(demo_data),
    ]
    assert main(args) == 0
    assert f"scored {len(truth.iloc[::2])} labelled images" in capsys.readouterr().out
    pd.concat([truth, pd.DataFrame({"id": ["EXTRA"], "label": ["x"]})]).to_csv(tmp_path / "submission.csv", index=False)
    assert main([*args, "--force"]) == 2  # --force: the first run's per_class.csv is there (outputs are checked first)
    assert "0 missing, 1 extra (first: EXTRA)" in capsys.readouterr().err


def test_evaluate_finds_the_test_set_beside_partial_labels_or_asks_for_it(demo_data, tmp_path, capsys):
    """Public-half labels kept beside test.csv (as cub100-lr ships them) need no --data; elsewhere the error says to
    pass it."""
    truth = pd.read_csv(demo_data / "test_labels.csv", dtype=str)
    truth.to_csv(tmp_path / "submission.csv", index=False)
    folder = tmp_path / "test-folder"
    folder.mkdir()
    (folder / "test.csv").symlink_to(demo_data / "test.csv")
    (folder / "test").symlink_to(demo_data / "test")
    truth.iloc[::2].to_csv(folder / "public_labels.csv", index=False)
    assert (
        main(
            [
                "evaluate",
                "--submission",
                str(tmp_path / "submission.csv"),
                "--labels",
                str(folder / "public_labels.csv"),
            ]
        )
        == 0
    )
    assert f"scored {len(truth.iloc[::2])} labelled images" in capsys.readouterr().out
    truth.iloc[::2].to_csv(tmp_path / "public_labels.csv", index=False)
    assert (
        main(
            [
                "evaluate",
                "--submission",
                str(tmp_path / "submission.csv"),
                "--labels",
                str(tmp_path / "public_labels.csv"),
                "--force",
            ]
        )
        == 2
    )
    assert "or pass --data TEST_FOLDER when the labels cover part of it" in capsys.readouterr().err


def test_evaluate_refuses_duplicate_ids(demo_data, tmp_path, capsys):
    truth = pd.read_csv(demo_data / "test_labels.csv", dtype=str)
    pd.concat([truth, truth.iloc[:1]]).to_csv(tmp_path / "submission.csv", index=False)
    assert (
        main(
            [
                "evaluate",
                "--submission",
                str(tmp_path / "submission.csv"),
                "--labels",
                str(demo_data / "test_labels.csv"),
            ]
        )
        == 2
    )
    assert f"duplicate id '{truth['id'][0]}'" in capsys.readouterr().err


def test_train_run_from_python_writes_what_the_train_command_writes(demo_data, tmp_path):
    """The README's Python training call leaves the run folder, RUN/hf and the report, as `lowres-birds train` does."""
    from lowres_birds import train_run
    from lowres_birds.config import load_config

    fast = {"model": "timm:test_efficientnet", "pretrained": False, "strategy": "native", "kd_weight": 0.0}
    result = train_run(load_config("cpu", {**fast, "epochs": 1, "device": "cpu"}), demo_data, tmp_path / "run")
    assert 0 <= result["val_macro_f1"] <= 1
    assert (tmp_path / "run" / "hf" / "config.json").is_file()
    assert (tmp_path / "run" / "report" / "report.html").is_file()
