from pnsfw.store import Store


def test_labelled_store_has_all_rows(labelled_store):
    store = Store.open(labelled_store)
    assert store.rows == 80
    ids, vectors = store.vectors()
    assert sorted(ids.tolist()) == list(range(80))
    assert vectors.shape == (80, 256)
