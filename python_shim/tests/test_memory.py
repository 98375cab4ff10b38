import pytest
import torch

from csharp_kv import memory

B, N, H, D = 6, 4, 3, 8
SPEC = memory.KvSpec(block_size=N, num_kv_heads=H, head_size=D)


def _eras():
    shared = torch.zeros(B, 2, H, N, 2 * D, dtype=torch.float16)
    return {
        "kv_first": (torch.zeros(2, B, N, H, D, dtype=torch.bfloat16), lambda t: (t[0], t[1])),
        "blocks_first": (torch.zeros(B, 2, N, H, D, dtype=torch.float16), lambda t: (t[:, 0], t[:, 1])),
        "blocks_first_hnd": (torch.zeros(B, 2, H, N, D, dtype=torch.float16).permute(0, 1, 3, 2, 4),
                             lambda t: (t[:, 0], t[:, 1])),
        "packed": (torch.zeros(B, H, N, 2 * D, dtype=torch.float16),
                   lambda t: (t[..., :D].transpose(1, 2), t[..., D:].transpose(1, 2))),
        "shared_view_layer1": (shared[:, 1], lambda t: (t[..., :D].transpose(1, 2), t[..., D:].transpose(1, 2))),
    }


@pytest.mark.parametrize("era", list(_eras()))
def test_layout_addresses_every_row_like_torch_indexing(era):
    t, split = _eras()[era]
    lay = memory.describe_layout(t, SPEC)
    e, blocks, tokens, heads, row, sb, st, sh, k_off, v_off = lay
    assert (e, blocks, tokens, heads, row) == (t.element_size(), B, N, H, D * t.element_size())
    base, nbytes = memory.storage_extent(t)
    k, v = split(t)
    for b in range(B):
        for n in range(N):
            for h in range(H):
                assert k[b, n, h].data_ptr() - base == k_off + b * sb + n * st + h * sh
                assert v[b, n, h].data_ptr() - base == v_off + b * sb + n * st + h * sh
                assert v_off + b * sb + n * st + h * sh + row <= nbytes


def test_mla_has_no_separate_v():
    t = torch.zeros(B, N, 576, dtype=torch.float16)
    lay = memory.describe_layout(t, memory.KvSpec(N, 1, 576, use_mla=True))
    assert lay[3] == 1 and lay[4] == 576 * 2 and lay[9] == -1


@pytest.mark.parametrize("shape", [(B, N, H, D), (2, B, N, H, D + 1), (B, H, N, D), (7,)])
def test_unknown_layout_is_refused_with_shape_in_message(shape):
    with pytest.raises(memory.UnsupportedLayout, match="does not match"):
        memory.describe_layout(torch.zeros(*shape), SPEC)


def test_export_host_names_this_process_and_the_whole_storage():
    import os

    t = torch.zeros(2, B, N, H, D)[1]
    kind, pid, address, length = memory.export_host(t)[:4]
    assert (kind, pid) == (1, os.getpid())
    assert t.data_ptr() - address == t.storage_offset() * t.element_size()
    assert length == 2 * B * N * H * D * 4
