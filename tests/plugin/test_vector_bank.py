import pytest
import torch

from icv_vllm.plugin.resolved_spec import ResolvedChoice
from icv_vllm.plugin.vector_bank import BankFullError, VectorBank
from icv_vllm.plugin.vector_directory import file_digest
from icv_vllm.vectors.vector import ICVector


@pytest.fixture
def vector_dir(tmp_path):
    for i in range(4):
        ICVector(torch.full((3, 8), float(i + 1)), model="m", method="mean", num_pairs=1).save(
            tmp_path / f"v{i}.safetensors")
    return tmp_path


def choice(directory, i, scale=1.0):
    return ResolvedChoice(f"v{i}", file_digest(directory / f"v{i}.safetensors"), scale)


def test_loads_on_demand_and_reuses_slots(vector_dir):
    bank = VectorBank(vector_dir, 2, 3, 8, torch.device("cpu"))
    address = bank.tensor.data_ptr()
    slots = bank.slots_for((choice(vector_dir, 0), choice(vector_dir, 1)), set())
    assert sorted(slots) == [0, 1]
    assert bank.tensor[slots[1], 2].tolist() == [2.0] * 8
    assert bank.slots_for((choice(vector_dir, 1),), set()) == [slots[1]]
    assert bank.tensor.data_ptr() == address


def test_evicts_least_recently_used_but_never_pinned(vector_dir):
    bank = VectorBank(vector_dir, 2, 3, 8, torch.device("cpu"))
    s0, s1 = bank.slots_for((choice(vector_dir, 0), choice(vector_dir, 1)), set())
    bank.slots_for((choice(vector_dir, 0),), set())  # v0 now most recent
    (s2,) = bank.slots_for((choice(vector_dir, 2),), set())
    assert s2 == s1  # v1 was the least recently used
    assert [k[0] for k in bank.loaded()] == ["v0", "v2"]
    pinned = set()
    bank.slots_for((choice(vector_dir, 0), choice(vector_dir, 2)), pinned)
    with pytest.raises(BankFullError, match="more than 2 distinct vectors; raise max_slots"):
        bank.slots_for((choice(vector_dir, 3),), pinned)


def test_replaced_file_is_loaded_again(vector_dir):
    bank = VectorBank(vector_dir, 2, 3, 8, torch.device("cpu"))
    (slot,) = bank.slots_for((choice(vector_dir, 0),), set())
    ICVector(torch.full((3, 8), 9.0), model="m", method="mean", num_pairs=1).save(vector_dir / "v0.safetensors")
    (slot,) = bank.slots_for((choice(vector_dir, 0),), set())
    assert bank.tensor[slot, 0, 0].item() == 9.0


def test_wrong_shape_is_refused(vector_dir):
    bank = VectorBank(vector_dir, 2, 4, 8, torch.device("cpu"))
    with pytest.raises(ValueError, match="model needs"):
        bank.slots_for((choice(vector_dir, 0),), set())


def test_growable_bank_doubles_instead_of_failing(vector_dir):
    """Off CUDA nothing captures the bank's address: a step with more distinct
    vectors than slots grows it and every request stays steered."""
    bank = VectorBank(vector_dir, 2, 3, 8, torch.device("cpu"), growable=True)
    pinned = set()
    slots = bank.slots_for(tuple(choice(vector_dir, i) for i in range(4)), pinned)
    assert sorted(slots) == [0, 1, 2, 3] and bank.capacity == 4
    for i, slot in enumerate(slots):
        assert bank.tensor[slot, 0, 0].item() == float(i + 1)
