"""Graph files from elsewhere: a pickle runs no code, an edge list that leaves nodes out says so
(issue 14, items 2 and 10)."""

import pickle

import numpy as np
import pytest

from stfast.data import load_adjacency


class _WritesMarker:
    """Unpickling this object calls ``open(marker, "w")``: a stand-in for any code a file could run."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


@pytest.mark.parametrize("protocol", [0, 2, pickle.HIGHEST_PROTOCOL])
def test_a_crafted_graph_pickle_is_refused_and_runs_nothing(tmp_path, protocol):
    marker = tmp_path / "marker"
    path = tmp_path / "adj_mx.pkl"
    path.write_bytes(pickle.dumps([["a"], {"a": 0}, _WritesMarker(marker)], protocol=protocol))
    with pytest.raises(ValueError, match=r"path: cannot unpickle .*adj_mx.pkl \(refusing to load (builtins|io).open"):
        load_adjacency(path)
    assert not marker.exists()


def test_a_crafted_ids_pickle_is_refused_and_runs_nothing(tmp_path):
    marker = tmp_path / "marker"
    (tmp_path / "ids.pkl").write_bytes(pickle.dumps(_WritesMarker(marker)))
    (tmp_path / "edges.csv").write_text("from,to,cost\na,b,1\n")
    with pytest.raises(ValueError, match="refusing to load (builtins|io).open"):
        load_adjacency(tmp_path / "edges.csv", ids_path=tmp_path / "ids.pkl")
    assert not marker.exists()


@pytest.mark.parametrize("protocol", [0, 2, pickle.HIGHEST_PROTOCOL])
def test_a_dcrnn_pickle_as_numpy_writes_it_still_loads(tmp_path, protocol):
    matrix = np.arange(9, dtype=np.float32).reshape(3, 3)
    path = tmp_path / "adj_mx.pkl"
    path.write_bytes(pickle.dumps([["7", "8", "9"], {"7": 0, "8": 1, "9": 2}, matrix], protocol=protocol))
    np.testing.assert_array_equal(load_adjacency(path), matrix)


@pytest.mark.parametrize("relative, nodes", [("METR-LA/adj_mx.pkl", 207), ("PEMS-BAY/adj_mx_bay.pkl", 325)])
def test_the_published_dcrnn_pickles_still_load(shared_file, relative, nodes):
    adjacency = load_adjacency(shared_file(relative), nodes)
    assert adjacency.shape == (nodes, nodes) and adjacency.dtype == np.float32 and (np.diag(adjacency) == 1).all()


def test_an_edge_list_that_leaves_the_last_nodes_out_is_refused(tmp_path):
    path = tmp_path / "edges.csv"
    path.write_text("from,to,cost\n0,1,1.0\n1,2,2.0\n")
    with pytest.raises(ValueError, match=r"num_nodes: .*largest node index in .*edges.csv is 2, so nodes 3\.\.4 "
                                         r"of 5 would have no edge"):
        load_adjacency(path, 5)
    assert load_adjacency(path, 3).shape == (3, 3)
