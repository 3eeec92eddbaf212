"""Memory planning for the fast paths: the --cache-memory budget, read as accelerate reads sizes, and passes that fit it."""

import pytest
from accelerate.utils import convert_file_size_to_int
from conftest import tiny_model

from svdicl import memory
from svdicl.errors import SvdiclError


def test_plan_passes_keeps_each_pass_within_budget():
    model = tiny_model("llama")
    shapes = [(8, 20), (8, 30), (8, 25), (4, 40), (8, 10)]
    cost = memory.cache_cost(model, 50)
    working = max(cost.working(r, n, 50) for r, n in shapes)
    assert memory.plan_passes(model, 50, shapes, 1 << 40) == [range(0, 5)]
    budget = cost.fixed + working + 2 * 8 * 30 * cost.per_token
    passes = memory.plan_passes(model, 50, shapes, budget)
    assert [i for p in passes for i in p] == list(range(5)) and len(passes) > 1
    for group in passes:
        assert cost.fixed + working + sum(shapes[i][0] * shapes[i][1] * cost.per_token for i in group) <= budget
    assert memory.plan_passes(model, 50, shapes, cost.fixed) is None  # not even one batch: use the plain path


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("4GiB", 4 << 30),
        ("512MiB", 512 << 20),
        ("64KiB", 64 << 10),
        ("4GB", 4 * 10**9),
        ("1.5GB", 1_500_000_000),
        ("2MB", 2 * 10**6),
    ],
)
def test_parse_memory_reads_both_units_as_accelerate_does(text, size):
    """GiB is 2^30 and GB 10^9, as in accelerate's max_memory (and lm-eval's --max_memory_per_gpu)."""
    assert memory.parse_memory(text) == convert_file_size_to_int(text) == size


@pytest.mark.parametrize(
    ("text", "size"), [("1.5gb", 1_500_000_000), ("4 gib", 4 << 30), ("512mib", 512 << 20), ("1000", 1000), (4096, 4096)]
)
def test_parse_memory_reads_any_case_and_plain_bytes(text, size):
    """A lower-case `b` means bytes here (accelerate reads `gb` as gigabits: a budget is never in bits)."""
    assert memory.parse_memory(text) == size


@pytest.mark.parametrize("text", ["lots", "2G", "4TB", "-1GB", "GiB"])
def test_parse_memory_refuses_what_it_cannot_read(text):
    with pytest.raises(SvdiclError, match="cannot read memory size") as error:
        memory.parse_memory(text)
    assert "4GiB (4 x 2^30 bytes), 4GB (4 x 10^9 bytes)" in str(error.value) and "\n" not in str(error.value)


def test_format_size_names_binary_units():
    assert memory.format_size(3 << 29) == "1.50 GiB"
    assert memory.format_size(512 << 20) == "512.0 MiB"
