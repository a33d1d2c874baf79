"""Items without interactions: item table reader, catalog items in the export and the index, numpy
embedding of new items from their features (issue 18)."""

import json

import numpy as np
import polars as pl
import pytest
import torch

from recsys_metric.cold_items import excluded_item_nums, read_item_eligibility
from recsys_metric.config import config_from_dict
from recsys_metric.data.item_table import read_item_table
from recsys_metric.data.synthetic import generate_log
from recsys_metric.data.vocab import Vocabulary
from recsys_metric.errors import DataError
from recsys_metric.export import read_embeddings
from recsys_metric.index import AnnoyIndex
from recsys_metric.item_embedder import ItemEmbedder
from recsys_metric.model.features import ItemFeatureTensors
from recsys_metric.pipeline import load_model, train_run

# --------------------------------------------------------------------------- item table reader


def test_delimited_tags_and_list_tags_read_alike(tmp_path):
    pl.DataFrame({"item_id": [1, 2, 3], "genres": ["Action|Comedy", " Drama ", None]}).write_csv(
        tmp_path / "a.csv"
    )
    pl.DataFrame({"item_id": [1, 2, 3], "genres": [["Action", "Comedy"], ["Drama"], None]}).write_parquet(
        tmp_path / "b.parquet"
    )
    a = read_item_table(tmp_path / "a.csv", tag_columns=["genres"])
    b = read_item_table(tmp_path / "b.parquet", tag_columns=["genres"])
    assert a["genres"].to_list() == [["Action", "Comedy"], ["Drama"], None]
    assert a.equals(b)


def test_configurable_separator(tmp_path):
    pl.DataFrame({"item_id": ["x", "y"], "kw": ["ml; ir;", "db"]}).write_parquet(tmp_path / "t.parquet")
    table = read_item_table(tmp_path / "t.parquet", tag_columns=["kw"], separator=";")
    assert table["kw"].to_list() == [["ml", "ir"], ["db"]]


def test_movielens_movies_csv_genres(tmp_path):
    (tmp_path / "movies.csv").write_text(
        'movieId,title,genres\n1,Toy Story (1995),Adventure|Animation\n2,"Heat, The (1995)",(no genres listed)\n'
    )
    table = read_item_table(tmp_path / "movies.csv")
    assert table.schema["item_id"] == pl.Int64
    assert table["genres"].to_list() == [["Adventure", "Animation"], []]
    assert table["title"].to_list() == ["Toy Story (1995)", "Heat, The (1995)"]


def test_movielens_tags_csv_aggregated_per_item_and_joined_with_movies(tmp_path):
    (tmp_path / "movies.csv").write_text("movieId,title,genres\n1,A,Drama\n2,B,Comedy\n3,C,Horror\n")
    (tmp_path / "tags.csv").write_text(
        "userId,movieId,tag,timestamp\n1,1,Dark comedy,10\n2,1,dark comedy ,11\n2,1,pixar,12\n5,2,funny,1\n7,9,x,1\n"
    )
    tags = read_item_table(tmp_path / "tags.csv")
    assert tags.to_dicts() == [
        {"item_id": 1, "tags": ["dark comedy", "pixar"]},
        {"item_id": 2, "tags": ["funny"]},
        {"item_id": 9, "tags": ["x"]},
    ]
    both = read_item_table([tmp_path / "movies.csv", tmp_path / "tags.csv"]).sort("item_id")
    assert both["item_id"].to_list() == [1, 2, 3, 9]
    assert both["tags"].to_list() == [["dark comedy", "pixar"], ["funny"], None, ["x"]]
    assert both["genres"].to_list() == [["Drama"], ["Comedy"], ["Horror"], None]


def test_item_table_errors_name_the_file_and_the_fix(tmp_path):
    with pytest.raises(DataError, match=r"items\.parquet does not exist"):
        read_item_table(tmp_path / "items.parquet")
    pl.DataFrame({"id": [1]}).write_csv(tmp_path / "x.csv")
    with pytest.raises(DataError, match=r"x\.csv \(1 rows\) has no item_id column .*rename"):
        read_item_table(tmp_path / "x.csv")
    pl.DataFrame({"item_id": [1, 1], "tags": ["a", "b"]}).write_csv(tmp_path / "d.csv")
    with pytest.raises(DataError, match=r"d\.csv \(2 rows\) repeats 1 item_id"):
        read_item_table(tmp_path / "d.csv")
    pl.DataFrame({"item_id": [1], "tags": [3.5]}).write_parquet(tmp_path / "f.parquet")
    with pytest.raises(DataError, match=r"column 'tags' \(1 rows\) is Float64; a tag column must hold"):
        read_item_table(tmp_path / "f.parquet", tag_columns=["tags"])
    with pytest.raises(DataError, match=r"item_tag_columns names \['genre'\], which no item file has"):
        read_item_table(tmp_path / "f.parquet", tag_columns=["genre"])


# --------------------------------------------------------------------------- catalog items in a run

FEATURES = ["category", "price", "tags"]
CONFIG = {
    "train": {"epochs": 3, "patience": 2, "batch_size": 512, "lr": 0.05},
    "eval": {"ks": [10]},
    "publish": {"gate_k": 10},
    "model": {"item_features": FEATURES, "dim": 16},
    "data": {"item_tag_columns": ["tags"]},
}


@pytest.fixture(scope="module")
def catalog(tmp_path_factory):
    """A run whose item table lists 10 items nobody interacted with, and one item with no feature the
    model knows (skipped). The tags are written as ``|``-delimited strings (data.item_tag_columns)."""
    d = tmp_path_factory.mktemp("catalog")
    log = generate_log(300, 150, 9000, n_clusters=6, seed=3, id_type="str")
    cold_ids = sorted(log.items["item_id"].to_list())[-10:]
    log.interactions.filter(~pl.col("item_id").is_in(cold_ids)).write_parquet(d / "interactions.parquet")
    items = log.items.with_columns(pl.col("tags").list.join("|"))
    bare = pl.DataFrame(
        {"item_id": ["zz_bare"], "category": ["never-seen"], "price": [None], "tags": ["nope|no"]}
    )
    items = pl.concat([items, bare.cast(items.schema)])
    items.write_parquet(d / "items.parquet")
    run_dir = d / "run"
    result = train_run(
        d / "interactions.parquet",
        run_dir,
        config_from_dict(CONFIG),
        items=d / "items.parquet",
        progress=False,
    )
    return result, run_dir, cold_ids, read_item_table(d / "items.parquet", tag_columns=["tags"])


def test_cold_items_are_exported_with_zero_training_interactions(catalog):
    result, run_dir, cold_ids, _ = catalog
    table = read_embeddings(run_dir / "item_embeddings.parquet")
    ids = table.ids.to_list()
    assert ids[-10:] == cold_ids, "appended after the known items, sorted"
    assert "zz_bare" not in ids
    assert Vocabulary.load(run_dir / "items.parquet").ids().to_list() == ids
    eligibility = read_item_eligibility(run_dir / "item_embeddings.parquet")
    assert eligibility.policy == "eligible"
    counts = eligibility.n_train_interactions
    assert counts.shape == (150,)
    np.testing.assert_array_equal(eligibility.cold, np.arange(140, 150))
    full = pl.read_parquet(run_dir / "interactions.parquet")
    np.testing.assert_array_equal(counts[:140], np.bincount(full["item_num"].to_numpy(), minlength=140))
    assert excluded_item_nums(run_dir).size == 0
    catalog_info = result.metrics["catalog"]
    assert catalog_info["items_added"] == 10 and catalog_info["items_known"] == 140
    assert catalog_info["skipped_no_features"] == 1 and catalog_info["skipped_examples"] == ["zz_bare"]
    holdout = read_embeddings(run_dir / "holdout" / "item_embeddings.parquet")
    assert holdout.ids.to_list() == ids, "the holdout model covers the same rows (warm start maps by them)"


def test_cold_items_are_placed_by_their_features_alone(catalog):
    result, run_dir, cold_ids, items = catalog
    model = load_model(run_dir)
    assert model.n_items == 150
    assert torch.count_nonzero(model.item_embedding.weight[140:]) == 0
    features = ItemFeatureTensors.from_frame(items, pl.Series(cold_ids), (), state=model.feature_state())
    with torch.no_grad():
        expected = model.item_embeddings_from_features(features).numpy()
    exported = read_embeddings(run_dir / "item_embeddings.parquet").vectors[140:]
    np.testing.assert_allclose(exported, expected, rtol=1e-6, atol=1e-7)


def test_cold_items_are_in_the_index(catalog):
    _, run_dir, cold_ids, _ = catalog
    sidecar = json.loads((run_dir / "index.json").read_text())
    assert sidecar["n_items"] == 150
    vectors = read_embeddings(run_dir / "item_embeddings.parquet").vectors
    index = AnnoyIndex.load(run_dir, vectors=vectors)
    found, _ = index.search(vectors[140:150], 1)
    assert found[:, 0].tolist() == list(range(140, 150)), "each cold item is its own nearest neighbour"


def test_recommender_can_return_cold_items(catalog):
    from recsys_metric.recommend import Recommender

    _, run_dir, cold_ids, _ = catalog
    rec = Recommender.load(run_dir)
    user = rec.user_ids[0]
    answer = rec.recommend(user, k=5, candidates=cold_ids)
    assert set(answer["item_id"].to_list()) <= set(cold_ids) and len(answer) == 5
    exact = rec.recommend(user, k=150, exact=True)
    assert set(cold_ids) <= set(exact["item_id"].to_list())


def test_excluded_policy_is_recorded_for_the_query_side(tmp_path):
    log = generate_log(120, 60, 2500, n_clusters=3, seed=5, id_type="int")
    cold_ids = sorted(log.items["item_id"].to_list())[-4:]
    log.interactions.filter(~pl.col("item_id").is_in(cold_ids)).write_parquet(tmp_path / "log.parquet")
    log.items.write_parquet(tmp_path / "items.parquet")
    cfg = config_from_dict(
        {**CONFIG, "data": {"cold_items": "excluded"}, "train": {"epochs": 1, "batch_size": 512}}
    )
    train_run(
        tmp_path / "log.parquet", tmp_path / "run", cfg, items=tmp_path / "items.parquet", progress=False
    )
    eligibility = read_item_eligibility(tmp_path / "run" / "item_embeddings.parquet")
    assert eligibility.policy == "excluded"
    ids = read_embeddings(tmp_path / "run" / "item_embeddings.parquet").ids
    np.testing.assert_array_equal(ids.gather(excluded_item_nums(tmp_path / "run")).to_list(), cold_ids)

    # The query side honours it: no answer holds a cold item, even when asked for every item.
    from recsys_metric.serving import Recommender, write_recommendations

    rec = Recommender.load(tmp_path / "run", output="polars")
    n_warm = len(ids) - len(cold_ids)
    every = rec.recommend(rec.user_ids[0], k=len(ids), exclude_seen=False, exact=True)
    assert len(every) == n_warm and not set(every["item_id"].to_list()) & set(cold_ids)
    similar = rec.similar_items(rec.item_ids[0], k=len(ids))
    assert len(similar) == n_warm - 1 and not set(similar["item_id"].to_list()) & set(cold_ids)
    history = rec.recommend_for_history(rec.item_ids[:2].to_list(), k=5)
    assert not set(history["item_id"].to_list()) & set(cold_ids)
    write_recommendations(tmp_path / "run", tmp_path / "table", k=len(ids), progress=False)
    table = pl.read_parquet(tmp_path / "table" / "*.parquet")
    assert table["item_id"].n_unique() <= n_warm and not set(table["item_id"].to_list()) & set(cold_ids)


# --------------------------------------------------------------------------- numpy item embedder


def test_embedding_a_known_item_returns_its_exported_vector(catalog):
    _, run_dir, _, items = catalog
    embedder = ItemEmbedder.load(run_dir)
    exported = read_embeddings(run_dir / "item_embeddings.parquet")
    frame = pl.DataFrame({"item_id": exported.ids}).join(
        items, on="item_id", how="left", maintain_order="left"
    )
    np.testing.assert_allclose(embedder.embed(frame), exported.vectors, rtol=1e-5, atol=1e-6)
    one = embedder.embed(frame.slice(7, 1).with_columns(pl.col("tags").list.join("|")))
    np.testing.assert_allclose(one[0], exported.vectors[7], rtol=1e-5, atol=1e-6)


def test_new_item_matches_the_torch_feature_tower(catalog):
    _, run_dir, _, _ = catalog
    model = load_model(run_dir)
    new = pl.DataFrame(
        {
            "item_id": ["n1", "n2"],
            "category": ["cat1", None],
            "price": [120.0, None],
            "tags": [["tag03", "tag07"], ["tag01"]],
        }
    )
    features = ItemFeatureTensors.from_frame(new, new["item_id"], (), state=model.feature_state())
    with torch.no_grad():
        expected = model.item_embeddings_from_features(features).numpy()
    np.testing.assert_allclose(ItemEmbedder.load(run_dir).embed(new), expected, rtol=1e-5, atol=1e-6)


def test_unknown_feature_values_map_to_the_missing_code(catalog):
    _, run_dir, _, _ = catalog
    embedder = ItemEmbedder.load(run_dir)
    unseen = pl.DataFrame(
        {"item_id": ["n"], "category": ["brand-new"], "price": [None], "tags": [["tag03", "??"]]}
    )
    missing = pl.DataFrame({"item_id": ["n"], "category": [None], "price": [None], "tags": [["tag03"]]}).cast(
        unseen.schema
    )
    codes = embedder.encode(unseen)
    assert codes["categorical"].tolist() == [[0]]
    assert codes["tags"][0][0].tolist() == [0, 1]
    np.testing.assert_array_equal(embedder.embed(unseen), embedder.embed(missing))


def test_a_new_item_without_any_known_feature_is_a_clear_error(catalog):
    _, run_dir, _, _ = catalog
    embedder = ItemEmbedder.load(run_dir)
    frame = pl.DataFrame(
        {
            "item_id": ["ok", "bare"],
            "category": ["cat1", "nope"],
            "price": [None, None],
            "tags": [["tag01"], []],
        }
    )
    with pytest.raises(
        DataError, match=r"1 of 2 new item\(s\) have no feature value the model knows .*'bare'"
    ):
        embedder.embed(frame)
    with pytest.raises(DataError, match=r"lacks the feature column\(s\) \['price'\]"):
        embedder.embed(frame.drop("price"))


def test_a_run_without_features_has_no_item_embedder(tmp_path):
    with pytest.raises(DataError, match="only a run trained with model.item_features can embed new items"):
        ItemEmbedder.load(tmp_path)


def test_recommender_embeds_and_adds_items_of_a_trained_run(catalog):
    """Recommender.embed_items of the run's items gives their exported vectors; an item added after
    the run with a cold item's features lands on that cold item (both are features alone)."""
    from recsys_metric.serving import Recommender

    _, run_dir, cold_ids, items = catalog
    rec = Recommender.load(run_dir, output="polars")
    exported = read_embeddings(run_dir / "item_embeddings.parquet")
    frame = pl.DataFrame({"item_id": exported.ids}).join(
        items, on="item_id", how="left", maintain_order="left"
    )
    np.testing.assert_allclose(rec.embed_items(frame), exported.vectors, rtol=1e-5, atol=1e-6)

    twin = frame.filter(pl.col("item_id") == cold_ids[0]).with_columns(item_id=pl.lit("twin-of-cold"))
    assert rec.add_items(twin).added == ["twin-of-cold"]
    for exact in (False, True):
        first = rec.similar_items(cold_ids[0], k=1, exact=exact)
        assert first["item_id"].to_list() == ["twin-of-cold"]
        assert first["score"][0] == pytest.approx(0.0, abs=1e-2)
    user = rec.user_ids[0]
    every = rec.recommend(user, k=rec.n_items, exclude_seen=False, exact=True)
    ranks = dict(zip(every["item_id"].to_list(), every["rank"].to_list(), strict=True))
    assert abs(ranks["twin-of-cold"] - ranks[cold_ids[0]]) == 1, "the twin ranks next to its cold item"
