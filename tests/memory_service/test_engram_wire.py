"""Engram rows on the wire in the table's own format (`memory_service.engram_wire`) and the row server that
sends them (`EngramRowServer`). References: model_worker's in-process `EngramTable.lookup`, the e4m3 / e8m0
bit decoder of test_engram_tables, and the byte sizes of the formats (D e4m3 bytes + D/32 scale bytes)."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from memory_service.engram_row_server import EngramRowServer
from memory_service.engram_tables import EngramTableStore
from memory_service.engram_wire import decode_rows, encode_rows, encoded_nbytes, ids_array, ids_tensor
from tests.memory_service.test_engram_tables import formula_rows, mixed_tables, write_tables


def test_encoded_rows_decode_to_the_in_process_rows_bit_for_bit(tmp_path):
    tables = mixed_tables()  # layer 1 fp8 (64 values), 4 bf16 (32), 6 fp32 (32)
    file = write_tables(tmp_path, tables)
    store = EngramTableStore(hot_cache_rows=16)
    store.add_model("m", tmp_path)
    gen = torch.Generator().manual_seed(3)
    bytes_per_row = {1: 64 + 2, 4: 2 * 32, 6: 4 * 32}
    for layer, table in tables.items():
        ids = torch.randint(0, table.rows, (300,), generator=gen)
        encoded = store.lookup_encoded("m", layer, ids)
        encoded = pickle.loads(pickle.dumps(encoded))  # what a transport does to it
        assert encoded["rows"].dtype == np.uint8 and encoded["rows"].shape == (300, bytes_per_row[layer])
        assert encoded_nbytes(encoded) == 300 * bytes_per_row[layer]
        assert torch.equal(decode_rows(encoded), table.lookup(ids))
        assert torch.equal(decode_rows(encoded), store.lookup("m", layer, ids))
    ids = torch.arange(tables[1].rows)
    assert torch.equal(decode_rows(store.lookup_encoded("m", 1, ids)), formula_rows(file, 1, ids))
    # layer 1: two encoded lookups and one plain, all counted
    assert store.stats()["m"][1]["lookups"] == 3 and store.stats()["m"][1]["ids"] == 2 * 300 + tables[1].rows
    store.close()


def test_encoded_lookup_of_a_shard_and_of_no_ids(tmp_path):
    tables = mixed_tables()
    write_tables(tmp_path, tables)
    store = EngramTableStore()
    store.add_model("m", tmp_path, shard=1, num_shards=2)  # rows [500, 1000) of layer 1
    ids = torch.tensor([500, 999, 731])
    assert torch.equal(decode_rows(store.lookup_encoded("m", 1, ids)), tables[1].lookup(ids))
    assert decode_rows(store.lookup_encoded("m", 1, ids[:0])).shape == (0, 64)
    with pytest.raises(ValueError, match=r"serves rows \[500, 1000\)"):
        store.lookup_encoded("m", 1, torch.tensor([3]))
    with pytest.raises(ValueError, match="flat"):
        store.lookup_encoded("m", 1, ids.reshape(3, 1))
    store.close()


def test_malformed_encoded_rows_are_refused():
    table = torch.randn(10, 64).to(torch.float8_e4m3fn)
    scales = torch.full((10, 2), 1.0).to(torch.float8_e8m0fnu)
    good = encode_rows(table, scales, torch.tensor([1, 2]))
    assert good["rows"].shape == (2, 66)
    cases = [
        ("a list", "expected a dict"),
        ({**good, "extra": 1}, "expected a dict"),
        ({**good, "dtype": "int8"}, "unknown dtype"),
        ({**good, "rows": torch.from_numpy(good["rows"])}, "numpy uint8"),
        ({**good, "rows": good["rows"].astype(np.int16)}, "numpy uint8"),
        ({**good, "rows": good["rows"][0]}, "numpy uint8"),
        ({**good, "rows": good["rows"][:, :64]}, "not a whole row of torch.float8_e4m3fn values and their scales"),
        ({**good, "rows": good["rows"][:, :34]}, "not a whole row"),
        ({"dtype": "bfloat16", "rows": good["rows"][:, :65]}, "not a whole row of torch.bfloat16"),
    ]
    for encoded, message in cases:
        with pytest.raises(ValueError, match=message):
            decode_rows(encoded)


def test_ids_cross_as_numpy_and_come_back_as_the_same_tensor():
    ids = torch.tensor([5, 0, 2**40], dtype=torch.int64)
    array = ids_array(ids)
    assert isinstance(array, np.ndarray) and array.dtype == np.int64
    array.setflags(write=False)  # as Ray hands it over
    back = ids_tensor(array)
    assert torch.equal(back, ids) and back.dtype == torch.int64
    assert ids_tensor(ids) is ids
    assert torch.equal(ids_tensor(ids_array(ids[:2].int())), ids[:2])  # int32 ids widen to int64


def test_row_server_answers_all_layers_in_one_call_and_counts_the_wire(tmp_path):
    tables = mixed_tables()
    write_tables(tmp_path, tables)
    server = EngramRowServer(tmp_path, "m", shard=0, num_shards=1, hot_cache_rows=0)
    assert server.info("m") == {"shard": 0, "num_shards": 1, "layer_rows": {1: 1000, 4: 777, 6: 50}}
    requests = {1: torch.tensor([3, 4, 999]), 4: torch.tensor([0, 776])}
    encoded = server.lookup_many("m", {layer: ids_array(ids) for layer, ids in requests.items()}, encoded=True)
    plain = server.lookup_many("m", requests)
    for layer, ids in requests.items():
        assert torch.equal(decode_rows(encoded[layer]), tables[layer].lookup(ids))
        assert torch.equal(plain[layer], tables[layer].lookup(ids))
    wire = 3 * 66 + 2 * 64  # the encoded call: fp8 rows + scales, bf16 rows
    assert server.traffic(reset=True) == {"requests": 2, "ids": 10, "id_bytes": 80,
                                          "row_bytes": wire + 3 * 256 + 2 * 128}  # + the fp32 call
    assert server.traffic() == {"requests": 0, "ids": 0, "id_bytes": 0, "row_bytes": 0}
    with pytest.raises(ValueError, match="no Engram table for layer 5"):
        server.lookup_many("m", {5: torch.tensor([0])}, encoded=True)
    with pytest.raises(TypeError, match="requests"):
        server.lookup_many("m", [torch.tensor([0])])
    server.close()
