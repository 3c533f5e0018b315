"""Evaluation: metrics on hand-checked inputs, embedding tile sets, the compare report, bad input."""


import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from typer.testing import CliRunner

from cli.main import app
from helpers import assert_links_resolve
from g2l_cache import G2LError
from g2l_student.evaluation.classify import (bootstrap_ci, classification_report, knn_predict,
                                             linear_probe_predict, make_split, scores)
from g2l_student.evaluation.compare import compare, similarity_between
from g2l_student.evaluation.demo_tiles import write_demo_tiles
from g2l_student.evaluation.embedder import (embed_tileset, load_embedding_model, read_embeddings)
from g2l_student.evaluation.robustness import (apd_units, croma_robustness, pathorob_apd, ri_ratio,
                                                 so_os_counts)
from g2l_student.evaluation.tileset import load_tileset

runner = CliRunner()


def test_knn_votes_and_scores_by_hand():
    train = np.array([[1.0, 0], [0.9, 0.1], [0, 1], [0.1, 0.9]])
    y = np.array(["a", "a", "b", "b"])
    classes = np.array(["a", "b"])
    query = np.array([[1.0, 0.05], [0.05, 1.0]])
    proba = knn_predict(train, y, query, classes, k=3)
    # query 0's 3 nearest: rows 0, 1 (class a) and 3 (class b), each voting exp(cosine / 0.07)
    cos = lambda u, v: u @ v / np.linalg.norm(u) / np.linalg.norm(v)  # noqa: E731
    w = {i: np.exp(cos(query[0], train[i]) / 0.07) for i in (0, 1, 3)}
    expected_a = (w[0] + w[1]) / (w[0] + w[1] + w[3])
    np.testing.assert_allclose(proba, [[expected_a, 1 - expected_a], [1 - expected_a, expected_a]], rtol=1e-5)
    # two neighbours, one per class: the closer one wins whatever the class order (no tie by order)
    two = knn_predict(train[[1, 2]], np.array(["b", "a"]), np.array([[0.2, 1.0]]), classes, k=2)
    assert two[0, 0] > 0.99
    s = scores(np.array(["a", "b", "b", "b"]), np.array([[0.9, 0.1], [0.6, 0.4], [0.2, 0.8], [0.3, 0.7]]), classes)
    # recall a = 1, recall b = 2/3 -> balanced 5/6; AUROC: b-scores .4,.8,.7 vs a .1 -> 1.0
    assert abs(s["balanced_accuracy"] - 5 / 6) < 1e-12 and s["auroc"] == 1.0
    # weighted F1: f1(a) = 2*(.5*1)/(1.5) = 2/3 (w 1/4), f1(b) = 2*(1*2/3)/(5/3) = 0.8 (w 3/4)
    assert abs(s["f1_weighted"] - (2 / 3 / 4 + 0.8 * 3 / 4)) < 1e-12


def test_linear_probe_and_bootstrap_on_separable_data():
    rng = np.random.default_rng(0)
    x = np.r_[rng.normal(-2, 0.3, (40, 5)), rng.normal(2, 0.3, (40, 5))]
    y = np.array(["neg"] * 40 + ["pos"] * 40)
    groups = np.repeat(np.arange(20), 4)
    split = make_split(y, None, groups, seed=1)
    assert not set(groups[split.train]) & set(groups[split.test])
    proba, c, how = linear_probe_predict(x[split.train], y[split.train], x[split.test], groups[split.train])
    assert f"C = {c} chosen from" in how
    assert "too few (< 4)" in linear_probe_predict(x[:8], y[[0, 40] * 4], x[:2], np.repeat([1, 2], 4))[2]
    assert scores(y[split.test], proba, np.array(["neg", "pos"]))["balanced_accuracy"] == 1.0
    low, high = bootstrap_ci(y[split.test], proba, np.array(["neg", "pos"]), n=50)["auroc"]
    assert low == pytest.approx(1.0) and high == pytest.approx(1.0)
    rows, _ = classification_report(x, y, split, groups, k=5, n_boot=20)
    assert {r["metric"] for r in rows} == {f"{m}_{s}" for m in ("knn", "linear")
                                           for s in ("balanced_accuracy", "f1_weighted", "auroc")}


def test_robustness_counts_by_hand_and_against_croma():
    # tiles 0,1: class A at centres X,Y; tiles 2,3: class B at centres X,Y. Embedding groups by class.
    x = np.array([[1.0, 0.0], [0.95, 0.05], [0.0, 1.0], [0.05, 0.95]])
    labels, centers = np.array(["A", "A", "B", "B"]), np.array(["X", "Y", "X", "Y"])
    # k=1: every nearest neighbour is same class, other centre -> SO=4, OS=0
    assert so_os_counts(x, labels, centers, None, 1) == (4, 0)
    # k=2: second neighbours are 0->3 (B,Y: neither), 1->3 (B,Y: OS), 2->1 (A,Y: neither),
    # 3->1 (A,Y: OS), by cosine similarity
    assert so_os_counts(x, labels, centers, None, 2) == (4, 2)
    # a tile never counts its own group: groups pairing 0&1 and 2&3 remove the SO neighbours
    assert so_os_counts(x, labels, centers, np.array(["g1", "g1", "g2", "g2"]), 1)[0] == 0
    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 8))
    labels = np.array(["A", "B"] * 30)
    centers = np.array(["X"] * 20 + ["Y"] * 20 + ["Z"] * 20)
    x[labels == "A"] += 0.8
    x[centers == "X"] -= 0.5
    groups = np.array([f"s{i // 3}" for i in range(60)])
    r = croma_robustness(x, labels, centers, groups)
    so, os_ = so_os_counts(x, labels, centers, groups, r.ri_k)
    assert abs(r.ri - so / (so + os_)) < 1e-12 and 0 <= r.ri <= 1
    # croma's curve over k is the same pooled count at every k, and passes through its chosen k
    assert r.curve[r.ri_k] == r.ri and len(r.curve) == 9
    for kk, value in r.curve.items():
        so, os_ = so_os_counts(x, labels, centers, groups, kk)
        assert abs(value - so / (so + os_)) < 1e-12, kk
    assert 0 <= r.mari <= 1 and r.mari_tau > 0
    assert abs(ri_ratio(x, labels, centers, groups, 3) - np.divide(*so_os_counts(x, labels, centers, groups, 3))) < 1e-12


def _two_by_two(n_groups=18, tiles=6, odd_group_size=None):
    """2 centres x 2 classes, each (centre, class) cell holding n_groups single-class groups."""
    lab, cen, grp = [], [], []
    for c in range(2):
        for y in range(2):
            for g in range(n_groups):
                size = odd_group_size if (odd_group_size and g == 0) else tiles
                lab += [f"L{y}"] * size
                cen += [f"C{c}"] * size
                grp += [f"c{c}y{y}g{g}"] * size
    return np.array(lab), np.array(cen), np.array(grp)


def test_apd_units_by_hand_and_when_the_data_do_not_allow_it():
    labels, centers, groups = _two_by_two(n_groups=17, tiles=6, odd_group_size=2)
    rows, cen, cls, r = apd_units(labels, centers, groups)
    # every cell has 16 groups of 6 tiles and one of 2: the 16th largest is 6, the small group is dropped
    assert r == 6 and len(rows) == 4 * 16 * 6 and len(set(rows)) == len(rows)
    for start in range(0, len(rows), r):  # each unit: r consecutive rows of one group, one cell
        unit = rows[start:start + r]
        assert len(set(groups[unit])) == 1 and len(set(cen[start:start + r])) == 1
    assert (labels[rows] == np.where(cls == 1, "L1", "L0")).all()
    assert (centers[rows] == np.where(cen == 1, "C1", "C0")).all()
    assert "2 centres and 2 classes" in apd_units(labels, np.where(centers == "C0", "C0", labels), groups)
    few = _two_by_two(n_groups=15)
    assert "16 groups in every (centre, class) cell" in apd_units(*few)
    assert "'group' column" in apd_units(labels, centers, None)
    mixed = groups.copy()
    mixed[0] = groups[-1]  # one group now spans both centres
    assert "spans several" in apd_units(labels, centers, mixed)


def test_apd_penalises_an_embedding_that_encodes_the_centre():
    labels, centers, groups = _two_by_two()
    rng = np.random.default_rng(0)
    biology = rng.normal(size=(len(labels), 8))
    biology[:, 0] += 3.0 * (labels == "L1")
    confounded = biology.copy()
    confounded[:, 0] = rng.normal(size=len(labels)) + 0.6 * (labels == "L1")  # weak biology
    confounded[:, 1] += 4.0 * (centers == "C1")  # strong centre
    clean, r = pathorob_apd(biology, labels, centers, groups, iterations=3)
    dirty, _ = pathorob_apd(confounded, labels, centers, groups, iterations=3)
    # biology alone: the confounded training splits cost nothing; a centre signal costs accuracy
    assert r == 6 and abs(clean) < 0.02 and dirty < clean - 0.05


def test_robustness_with_one_centre_is_undefined():
    x = np.random.default_rng(0).normal(size=(10, 4))
    with pytest.raises(G2LError, match="single centre"):
        ri_ratio(x, np.array(["A", "B"] * 5), np.array(["X"] * 10), None, 3)


@pytest.fixture(scope="module")
def tiles(tmp_path_factory):
    return write_demo_tiles(tmp_path_factory.mktemp("tiles"), n_crops=12, n_centres=2, tile_px=64)


def test_demo_tiles_and_embedding_cache(tiles, tmp_path):
    ts = load_tileset(tiles)
    assert ts.table.height == 24 and set(ts.table["center"]) == {"centre-a", "centre-b"}
    assert set(ts.table["label"]) == {"dense", "sparse"}
    # the same crop is one group, on one side of the split only
    assert ts.table.group_by("group").agg(pl.col("split").n_unique())["split"].max() == 1
    model = load_embedding_model("vit_tiny_patch16_224", random_init=True, img_size=32)
    out = tmp_path / "tiny.parquet"
    assert embed_tileset(model, ts, out, progress=False) is True
    assert embed_tileset(model, ts, out, progress=False) is False  # cached: same model + data
    e = read_embeddings(out)
    assert e.vectors.shape == (24, 192) and e.table.columns == ["path", "label", "split", "center", "group"]
    assert embed_tileset(model, ts, out, data_mpp=0.25, progress=False) is True  # other data mpp


def test_embed_cli_on_folder_and_student_run(tiles, built_cache, tmp_path):
    from g2l_student.config import FitConfig
    from g2l_student.train import fit

    run = tmp_path / "run"
    fit(FitConfig(cache=str(built_cache), out=str(run), student="vit_tiny_patch16_224", random_init=True,
                  img_size=32, steps=2, batch_size=8, num_workers=0, progress=False, val_fraction=0.34))
    res = runner.invoke(app, ["embed", str(run), str(tiles), "--out", str(tmp_path / "student.parquet")])
    assert res.exit_code == 0, res.output
    assert read_embeddings(tmp_path / "student.parquet").vectors.shape == (24, 192)
    folder = tiles.parent  # class sub-folders
    res = runner.invoke(app, ["embed", "vit_tiny_patch16_224", str(folder), "--out",
                              str(tmp_path / "f.parquet"), "--random-init", "--img-size", "32"])
    assert res.exit_code == 0, res.output
    assert read_embeddings(tmp_path / "f.parquet").table.columns == ["path", "label"]


def _embed(tiles, tmp_path, name, model="vit_tiny_patch16_224", seed=0):
    m = load_embedding_model(model, random_init=True, img_size=32, seed=seed)
    out = tmp_path / f"{name}.parquet"
    embed_tileset(m, load_tileset(tiles), out, progress=False)
    return out


def test_compare_writes_report_metrics_and_pictures(tiles, tmp_path):
    a = _embed(tiles, tmp_path, "teacher", "vit_small_patch16_224")
    b = _embed(tiles, tmp_path, "student")
    res = runner.invoke(app, ["eval", "compare", str(a), str(b), "--out", str(tmp_path / "rep"),
                              "--bootstrap", "50", "--map", "pca"])
    assert res.exit_code == 0, res.output
    m = pl.read_csv(tmp_path / "rep" / "metrics.csv")
    assert m.columns == ["task", "model", "metric", "value", "k", "ci_low", "ci_high"]
    assert set(m["model"]) == {"teacher", "student"}
    ratio = m.filter(pl.col("metric") == "ri_ratio")
    assert sorted(ratio["k"].to_list()) == [3, 3, 20, 20]
    ri = m.filter(pl.col("metric") == "ri")
    assert ri.height == 2 and ri["value"].is_between(0, 1).all()
    curve = m.filter(pl.col("metric") == "ri_curve")
    # 24 tiles: the candidate k stop below the tile count
    assert curve.height == 2 * 7 and set(curve["k"]) == {1, 3, 5, 7, 10, 15, 20}
    for row in ri.iter_rows(named=True):  # the curve passes through the chosen k
        at_k = curve.filter((pl.col("model") == row["model"]) & (pl.col("k") == row["k"]))
        assert at_k["value"][0] == pytest.approx(row["value"])
    assert m.filter(pl.col("metric") == "mari")["value"].is_between(0, 1).all()
    assert m.filter(pl.col("metric") == "apd").height == 0  # 24 tiles: too few groups, said why
    knn = m.filter(pl.col("metric") == "knn_balanced_accuracy").row(0, named=True)
    assert knn["k"] == 20 and knn["ci_low"] <= knn["value"] <= knn["ci_high"]
    for metric in ("cka_vs_teacher", "cka_debiased_vs_teacher", "knn10_overlap_vs_teacher"):
        row = m.filter(pl.col("metric") == metric)
        assert row.height == 1 and row["model"][0] == "student" and -1 <= row["value"][0] <= 1
    for name in ("report.md", "bars-tiles.png", "map-tiles.png", "ri-curve-tiles.png"):
        assert (tmp_path / "rep" / name).exists()
    report = (tmp_path / "rep" / "report.md").read_text()
    assert "| teacher |" in report and "apd skipped: APD needs every group in one centre" in report
    assert "ri-curve-tiles.png" in report and "ri_curve" not in report.split("\n## ")[1].split("\n\n")[2]
    # the same report as one page that opens from disk: every picture it names is in the folder
    page = tmp_path / "rep" / "report.html"
    refs = assert_links_resolve(page)
    assert sorted(set(refs.refs)) == ["bars-tiles.png", "map-tiles.png", "ri-curve-tiles.png"]
    assert "<td>teacher</td>" in page.read_text() and "apd skipped" in page.read_text()


def test_bad_inputs(tiles, tmp_path):
    bad_csv = tmp_path / "bad.csv"
    bad_csv.write_text("file,label\nx.png,a\n")
    with pytest.raises(G2LError, match="'path'"):
        load_tileset(bad_csv)
    one = tmp_path / "one.csv"
    ts = load_tileset(tiles)
    ts.table.with_columns(pl.lit("dense").alias("label")).write_csv(one)
    out = _embed(one, tmp_path, "oneclass")
    with pytest.raises(G2LError, match="at least 2 classes"):
        compare([out], tmp_path / "r1", n_boot=5, map_method="pca")
    single = tmp_path / "single.csv"
    ts.table.with_columns(pl.lit("centre-a").alias("center")).write_csv(single)
    out = _embed(single, tmp_path, "onecentre")
    compare([out], tmp_path / "r2", n_boot=5, map_method="pca")
    assert "robustness index is undefined" in (tmp_path / "r2" / "report.md").read_text()
    a = _embed(tiles, tmp_path, "a")
    with pytest.raises(G2LError, match="different tile sets"):
        similarity_between(read_embeddings(a), read_embeddings(out))
    res = runner.invoke(app, ["eval", "cka", str(a), str(out)])
    assert res.exit_code == 2 and "different tile sets" in res.output
    nan = tmp_path / "nan.parquet"
    table = pq.read_table(a)
    vec = np.full((table.num_rows, 192), np.nan, dtype=np.float32)
    table = table.set_column(table.schema.get_field_index("embedding"), "embedding",
                             pa.FixedSizeListArray.from_arrays(pa.array(vec.reshape(-1)), 192))
    pq.write_table(table.replace_schema_metadata(pq.read_schema(a).metadata), nan)
    with pytest.raises(G2LError, match="NaN"):
        read_embeddings(nan)
    plain = tmp_path / "plain.parquet"
    pl.DataFrame({"path": ["x"], "label": ["a"]}).write_parquet(plain)
    with pytest.raises(G2LError, match="not written by `g2l embed`"):
        read_embeddings(plain)


def test_blocked_neighbours_equal_the_full_matrix(monkeypatch):
    import g2l_student.neighbours as neighbours

    rng = np.random.default_rng(0)
    x, ref = rng.normal(size=(37, 6)), rng.normal(size=(50, 6))
    monkeypatch.setattr(neighbours, "BLOCK_BYTES", 4 * 50 * 4)  # 4 query rows per block
    idx, sims = neighbours.nearest(x, ref, 5)
    full = (x / np.linalg.norm(x, axis=1, keepdims=True)) @ (ref / np.linalg.norm(ref, axis=1, keepdims=True)).T
    np.testing.assert_array_equal(idx, np.argsort(-full, axis=1)[:, :5])
    np.testing.assert_allclose(sims, np.sort(full, axis=1)[:, ::-1][:, :5], rtol=1e-5)
    # same-group rows never count; a row alone in its group keeps all others
    groups = np.repeat(np.arange(10), 5)[:50]
    codes = neighbours.group_codes(groups.astype(str), 50)
    idx, _ = neighbours.nearest(ref, ref, 3, codes, codes)
    assert all(groups[j] != groups[i] for i in range(50) for j in idx[i])
    idx, sims = neighbours.nearest(ref[:3], ref[:3], 3, np.zeros(3, int), np.zeros(3, int))
    assert (idx == -1).all() and np.isneginf(sims).all()  # nothing allowed: marked, not invented


def test_embedding_a_run_without_export_asks_for_one_and_writes_nothing(tmp_path):
    from g2l_student.evaluation.embedder import load_embedding_model

    run = tmp_path / "run"
    run.mkdir()
    (run / "run.json").write_text("{}")
    with pytest.raises(G2LError, match="g2l student export"):
        load_embedding_model(str(run))
    assert [p.name for p in run.iterdir()] == ["run.json"]


def test_bootstrap_resamples_whole_groups():
    # 4 groups of 25 tiles; a group is either all right or all wrong: tile resampling is far too sure
    y = np.array(["a", "b"] * 50)
    groups = np.repeat(["g1", "g2", "g3", "g4"], 25)
    right = np.isin(groups, ["g1", "g2", "g3"])
    proba = np.where((y == "a") == right, 1.0, 0.0)[:, None] * np.array([1.0, -1.0]) + np.array([0.0, 1.0])
    classes = np.array(["a", "b"])
    assert scores(y, proba, classes)["balanced_accuracy"] == 0.75
    tiles = bootstrap_ci(y, proba, classes, n=300, seed=0)["balanced_accuracy"]
    by_group = bootstrap_ci(y, proba, classes, n=300, seed=0, groups=groups)["balanced_accuracy"]
    assert tiles[1] - tiles[0] < 0.2 and by_group[0] <= 0.5 and by_group[1] == 1.0


@pytest.mark.parametrize("n_classes", [2, 3])
def test_linear_probe_matches_sklearns_logistic_regression(n_classes):
    from sklearn.linear_model import LogisticRegression

    from g2l_student.evaluation.classify import _column_stats, _fit_logistic, _probabilities

    rng = np.random.default_rng(n_classes)
    x = rng.normal(size=(300, 6)).astype(np.float32) * 3 + 5
    y = (x[:, 0] + rng.normal(size=300) > 5).astype(int) + (n_classes == 3) * (x[:, 1] > 6)
    xt = torch.from_numpy(x)
    mean, std = _column_stats(xt)
    w, b = _fit_logistic(xt, y, n_classes, mean, std, 0.1, torch.ones(300))
    ours = _probabilities(xt, w, b, mean, std)
    z = (x - x.mean(0)) / (x.std(0) + 1e-6)
    theirs = LogisticRegression(C=0.1, max_iter=5000, tol=1e-10).fit(z, y).predict_proba(z)
    np.testing.assert_allclose(ours, theirs, atol=2e-4)


@pytest.mark.parametrize("n_classes", [2, 3])
def test_weighted_resample_scores_equal_sklearn_on_the_resampled_tiles(n_classes):
    from g2l_student.evaluation.classify import _WeightedScores

    rng = np.random.default_rng(n_classes)
    classes = np.array(["a", "b", "c"][:n_classes])
    y = classes[rng.integers(0, n_classes, 200)]
    proba = rng.dirichlet(np.ones(n_classes), 200)
    proba[:20] = proba[0]  # ties in the scores
    scorer = _WeightedScores(np.searchsorted(classes, y), proba, n_classes)
    for draw in range(5):
        idx = rng.integers(0, 200, 200)
        ours = scorer(np.bincount(idx, minlength=200).astype(float))
        theirs = scores(y[idx], proba[idx], classes)
        for name in ("balanced_accuracy", "f1_weighted", "auroc"):
            assert ours[name] == pytest.approx(theirs[name], abs=1e-12), (draw, name)


def test_robustness_sample_keeps_whole_groups_and_is_seeded():
    from g2l_student.evaluation.compare import ri_sample

    groups = np.repeat([f"p{i}" for i in range(100)], 30)
    rows = ri_sample(groups, 3000, seed=0, limit=600)
    assert 570 <= len(rows) <= 600 and len(rows) % 30 == 0
    kept = set(groups[rows])
    assert all((groups[rows] == g).sum() == 30 for g in kept)  # whole groups only
    assert np.array_equal(rows, ri_sample(groups, 3000, seed=0, limit=600))
    assert np.array_equal(ri_sample(groups, 500, seed=0, limit=600), np.arange(500))


def test_compare_reports_apd_on_a_two_centre_two_class_set(tmp_path):
    from g2l_student.evaluation.embedder import write_embeddings

    labels, centers, groups = _two_by_two()
    rng = np.random.default_rng(1)
    x = rng.normal(size=(len(labels), 8)).astype(np.float32)
    x[:, 0] += 3.0 * (labels == "L1")
    table = pl.DataFrame({"path": [f"t{i}.png" for i in range(len(labels))], "label": labels,
                          "center": centers, "group": groups})
    path = tmp_path / "model.parquet"
    write_embeddings(path, table, x, {"model": "m", "model_fingerprint": "m-1", "data": "two-by-two",
                                      "data_fingerprint": "d-1", "data_mpp": None, "model_mpp": 0.5})
    m = compare([path], tmp_path / "rep", n_boot=5, map_method="pca", apd_iterations=2)
    apd = m.filter(pl.col("metric") == "apd")
    assert apd.height == 1
    expected, _ = pathorob_apd(x, labels, centers, groups, iterations=2)
    assert apd["value"][0] == pytest.approx(expected)
    assert "apd (PathoROB's Camelyon schedule, croma) over 2 replicates, 6 tiles per group" in \
        (tmp_path / "rep" / "report.md").read_text()
