"""`textrefiner-results` on a fabricated output tree with hand-computed numbers."""

import csv
import io

import pytest

from textrefiner import results

CFG = "vit_b16_ep10_ctxv1"


def write_log(root, stage, dataset, method, seed, acc, shots=16, setting="base2new", cfg=CFG):
    run = root / setting / stage / dataset / f"shots_{shots}" / method / cfg / f"seed{seed}"
    run.mkdir(parents=True)
    if acc == "missing":
        return
    lines = ["epoch [1/10] loss 1.0", "=> result", "* accuracy: 10.0%"]  # an earlier evaluation
    if acc is not None:
        lines += ["=> result", "* total: 1,000", f"* accuracy: {acc}%", "* error: 1.0%", "* macro_f1: 1.0%"]
    (run / "log.txt").write_text("\n".join(lines[:1] if acc is None else lines) + "\n")


@pytest.fixture
def tree(tmp_path):
    for seed, base, novel in ((1, 90, 80), (2, 92, 82), (3, 94, 84)):
        write_log(tmp_path, "train_base", "oxford_pets", "CoOp", seed, base)
        write_log(tmp_path, "test_new", "oxford_pets", "CoOp", seed, novel)
    for seed, base, novel in ((1, 60, 40), (2, 70, 50)):
        write_log(tmp_path, "train_base", "dtd", "CoOp", seed, base)
        write_log(tmp_path, "test_new", "dtd", "CoOp", seed, novel)
    write_log(tmp_path, "train_base", "dtd", "CoOp", 3, "missing")  # no log.txt
    write_log(tmp_path, "test_new", "dtd", "CoOp", 3, None)  # log without an accuracy line
    write_log(tmp_path, "train_base", "oxford_pets", "CoOp+TR", 1, 95.5)
    write_log(tmp_path, "test_new", "oxford_pets", "CoOp+TR", 1, 97.25)
    for seed, imnet, v2, sketch in ((1, 71.5, 64.2, 48.0), (2, 71.52, 64.2, 47.98)):
        write_log(tmp_path, "train", "imagenet", "CoOp", seed, imnet, setting="xd")
        write_log(tmp_path, "test", "imagenetv2", "CoOp", seed, v2, setting="xd")
        write_log(tmp_path, "test", "imagenet_sketch", "CoOp", seed, sketch, setting="xd")
    return tmp_path


def test_harmonic_mean_matches_paper_average_row():
    # Table 1, CLIP "Average": base 69.34, novel 74.22 -> HM 71.70 (HM of the averages).
    assert round(results.harmonic_mean(69.34, 74.22), 2) == 71.70
    assert results.harmonic_mean(None, 50.0) is None


def test_read_accuracy_takes_last_line(tmp_path):
    log = tmp_path / "log.txt"
    log.write_text("* accuracy: 50.0%\nfoo\n* accuracy: 81.2%\n* error: 18.8%\n")
    assert results.read_accuracy(log) == 81.2
    assert results.read_accuracy(tmp_path / "absent.txt") is None


def test_summarize_base2new(tree):
    (row,) = results.summarize_base2new(tree, dataset="dtd", method="CoOp")
    assert (row.base, row.novel, row.base_seeds, row.novel_seeds) == (65, 45, 2, 2)
    assert row.hm == pytest.approx(2 * 65 * 45 / 110)
    assert {r.method for r in results.summarize_base2new(tree, dataset="oxford_pets")} == {"CoOp", "CoOp+TR"}
    assert len(results.summarize_base2new(tree)) == 3


def test_markdown_csv_png(tree, tmp_path, capsys):
    out = tmp_path / "report"
    assert results.main([str(tree), "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "log.txt missing" in err and "test_new/dtd" in err

    md = (out / "results.md").read_text()
    assert md.index("### Average") < md.index("### OxfordPets") < md.index("### DTD")
    assert "| CoOp | 78.50 | 63.50 | 70.21 | 2 |" in md  # average of pets and dtd; HM of the averages
    assert "| CoOp+TR | 95.50 | 97.25 | 96.37 | 1 |" in md
    assert "| CoOp | 92.00 | 82.00 | 86.71 | 3 |" in md
    assert "| CoOp | 65.00 | 45.00 | 53.18 | 2 |" in md
    assert "| Method | ImageNet | -V2 | -Sketch | Seeds |" in md
    assert "| CoOp | 71.51 | 64.20 | 47.99 | 2 |" in md

    rows = list(csv.DictReader(io.StringIO((out / "results.csv").read_text())))
    by_key = {(r["setting"], r["dataset"], r["method"]): r for r in rows}
    assert by_key[("base2new", "Average", "CoOp")]["hm"] == "70.21"
    assert by_key[("base2new", "oxford_pets", "CoOp")] == {
        "setting": "base2new", "dataset": "oxford_pets", "method": "CoOp", "cfg": CFG, "shots": "16",
        "seeds": "3", "base": "92.00", "novel": "82.00", "hm": "86.71", "accuracy": ""}
    assert by_key[("xd", "imagenet_sketch", "CoOp")]["accuracy"] == "47.99"
    assert len(rows) == 5 + 3

    assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_folder_of_ones_own_images_is_a_dataset_of_its_name(tree, tmp_path, capsys):
    """scripts/base2new.sh and sweep specs name a folder's runs after the folder."""
    for seed, base, novel in ((1, 50, 30), (2, 60, 40)):
        write_log(tree, "train_base", "my_pets", "CoOp+TR", seed, base)
        write_log(tree, "test_new", "my_pets", "CoOp+TR", seed, novel)
    out = tmp_path / "report"
    assert results.main([str(tree), "--out", str(out)]) == 0
    md = (out / "results.md").read_text()
    assert md.index("### DTD") < md.index("### my_pets")  # after the paper's datasets
    assert "| CoOp+TR | 55.00 | 35.00 | 42.78 | 2 |" in md
    capsys.readouterr()
    assert results.main([str(tree), "--base2new-summary", "--dataset", "my_pets"]) == 0
    assert capsys.readouterr().out.strip() == (
        f"my_pets CoOp+TR ({CFG}, 16 shots): base 55.00  novel 35.00  HM 42.78  (seeds: 2)")


def test_base2new_summary_cli(tree, capsys):
    assert results.main([str(tree), "--base2new-summary", "--dataset", "oxford_pets", "--method", "CoOp+TR"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out == [f"oxford_pets CoOp+TR ({CFG}, 16 shots): base 95.50  novel 97.25  HM 96.37  (seeds: 1)"]


def test_empty_tree_is_reported(tmp_path, capsys):
    assert results.main([str(tmp_path)]) == 1
    assert "no finished runs" in capsys.readouterr().err


def test_unwritable_out_is_one_line(tree, tmp_path, capsys):
    (tmp_path / "a_file").write_text("")
    assert results.main([str(tree), "--out", str(tmp_path / "a_file" / "report")]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and "error: cannot write the tables" in err and "a_file" in err


def test_methods_in_table_order_with_refined_rows_beside_them(tmp_path, capsys):
    methods = ["MaPLe+TR", "CoCoOp+TR", "ZeroshotCLIP", "CoOp", "Mine", "CoCoOp", "CoOp+TR"]
    for i, method in enumerate(methods):
        write_log(tmp_path, "train_base", "dtd", method, 1, 70 + i)
        write_log(tmp_path, "test_new", "dtd", method, 1, 60 + i)
        write_log(tmp_path, "test", "dtd", method, 1, 50 + i, setting="xd")
    assert results.main([str(tmp_path)]) == 0
    md = capsys.readouterr().out
    table_order = ["ZeroshotCLIP", "CoOp", "CoOp+TR", "CoCoOp", "CoCoOp+TR", "MaPLe+TR", "Mine"]
    b2n_part, xd_part = md.split("## Cross-dataset")
    for part in (b2n_part.split("### DTD")[1], b2n_part.split("### DTD")[0], xd_part):
        rows = [line.split(" | ")[0][2:] for line in part.splitlines() if line.startswith("| ")]
        assert [r for r in rows if r != "Method"] == table_order
    i = methods.index("CoCoOp+TR")
    assert f"| CoCoOp+TR | {70 + i:.2f} | {60 + i:.2f} |" in b2n_part
