"""k-NN in bounded memory: chunked scans equal the exact vote; a sharded bank over 2 gloo ranks
(one of them with an empty bank part, one with no queries) gives the single-process result."""
import json
import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from engine.knn import knn_accuracy, knn_classify, knn_topk
from engine.distributed import cleanup


def _exact_scores(train, labels, queries, num_classes, k, t):
    """The previous implementation: the whole similarity matrix at once."""
    top_sim, top_idx = (queries @ train.T).topk(min(k, len(train)), dim=1)
    votes = torch.zeros(len(queries), num_classes, dtype=queries.dtype)
    return votes.scatter_add_(1, labels[top_idx], (top_sim / t).exp())


def _data(seed=0, n=53, q=29, d=8, classes=4):
    g = torch.Generator().manual_seed(seed)
    norm = torch.nn.functional.normalize
    # float64: similarities from chunks of different shapes round alike to ~1e-16, so exp(sim / t)
    # agrees far beyond the test's tolerance (float32 would leave ~1e-6 after the exp)
    return (norm(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1), torch.randint(0, classes, (n,), generator=g),
            norm(torch.randn(q, d, generator=g, dtype=torch.float64), dim=1), torch.randint(0, classes, (q,), generator=g))


def test_chunked_knn_equals_the_exact_vote():
    bank, labels, queries, _ = _data()
    for k in (1, 7, 20, 80):                       # 80 > bank size: every entry votes
        exact = _exact_scores(bank, labels, queries, 4, k, 0.07)
        for chunk, bank_chunk in ((1, 1), (4, 5), (1000, 1000)):
            got = knn_classify(bank, labels, queries, 4, k=k, t=0.07, chunk=chunk, bank_chunk=bank_chunk)
            assert torch.allclose(got, exact, rtol=1e-12, atol=0), (k, chunk, bank_chunk)
    sim, lab = knn_topk(queries[:2], bank[:3], labels[:3], k=5, chunk=2)   # fewer entries than k
    assert torch.isinf(sim[:, 3:]).all() and (lab[:, 3:] == -1).all() and (lab[:, :3] >= 0).all()


def _reference_accuracy(bank, labels, queries, qlabels, k):
    top = _exact_scores(bank, labels, queries, 4, k, 0.07).topk(4, dim=1).indices
    hit = top.eq(qlabels.unsqueeze(1))
    return 100.0 * int(hit[:, 0].sum()) / len(qlabels), 100.0 * int(hit.any(1).sum()) / len(qlabels)


def _rank(rank, world, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    bank, labels, queries, qlabels = _data()
    # rank 0 holds the whole bank and a third of the queries; rank 1 an empty bank part and the rest
    if rank == 0:
        part = (bank, labels, queries[:10], qlabels[:10])
    else:
        part = (torch.zeros(0, 0, dtype=torch.float64), torch.zeros(0, dtype=torch.long), queries[10:], qlabels[10:])
    res = [knn_accuracy(*part, num_classes=4, k=7, chunk=3, bank_chunk=4)]
    # and the other way round: all queries on rank 1, the bank split unevenly, none of the queries on rank 0
    part = ((bank[:40], labels[:40], torch.zeros(0, 0, dtype=torch.float64), torch.zeros(0, dtype=torch.long)) if rank == 0 else
            (bank[40:], labels[40:], queries, qlabels))
    res.append(knn_accuracy(*part, num_classes=4, k=20, chunk=8, bank_chunk=16))
    (out / f"rank{rank}.json").write_text(json.dumps(res))
    cleanup()


def test_sharded_bank_over_two_gloo_ranks_matches_one_process(tmp_path):
    from engine.distributed import free_port
    bank, labels, queries, qlabels = _data()
    single = knn_accuracy(bank, labels, queries, qlabels, num_classes=4, k=7, chunk=5, bank_chunk=8)
    ref = _reference_accuracy(bank, labels, queries, qlabels, 7)
    assert (single["acc1"], single["acc5"]) == ref and single["count"] == 29
    mp.spawn(_rank, args=(2, free_port(), tmp_path), nprocs=2, join=True)
    for rank in (0, 1):
        first, second = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert (first["acc1"], first["acc5"], first["count"]) == (*ref, 29)
        ref20 = _reference_accuracy(bank, labels, queries, qlabels, 20)
        assert (second["acc1"], second["acc5"], second["count"]) == (*ref20, 29)
