"""Data parallelism over tensor-parallel replicas through the gRPC server:
two replicas of two Ray CPU actors each (gloo). Streams give the
single-device tokens; when one rank of one replica dies, that replica's
streams end with a clear status and the other replica's streams finish."""

from __future__ import annotations

import threading

import grpc
import pytest

ray = pytest.importorskip("ray")

from specserve import LLM  # noqa: E402
from specserve.config import EngineConfig  # noqa: E402
from specserve.engine.grpc_convert import pb, pb_grpc  # noqa: E402
from specserve.engine.server import BackgroundServer  # noqa: E402
from specserve.sampling_params import SamplingParams  # noqa: E402
from tests.e2e.test_server_e2e import collect, gen_request, wait_until  # noqa: E402
from tests.pair_factory import make_pair  # noqa: E402
from tests.ray_cluster import own_local_ray  # noqa: E402

OPTIONS = dict(num_speculative_tokens=3, num_kv_blocks=128, max_num_seqs=16, dtype="float32",
               device="cpu", executor="ray", data_parallel_size=2, tensor_parallel_size=2)


@pytest.fixture(scope="module")
def ray_cluster():
    yield from own_local_ray(4)


@pytest.fixture(autouse=True)
def one_cpu_thread_per_rank(monkeypatch):
    monkeypatch.setenv("SPECSERVE_RAY_CPU_THREADS", "1")


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return make_pair(tmp_path_factory.mktemp("dp_tp_pair"))


@pytest.mark.timeout(300)
def test_two_replicas_of_two_ranks(ray_cluster, pair):
    target, draft = pair
    prompts = [f"print({i} * {i})" for i in range(6)]
    greedy = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    local = LLM(model=target, draft_model=draft, num_speculative_tokens=3, num_kv_blocks=128,
                dtype="float32", device="cpu")
    try:
        want = [o.outputs[0].token_ids for o in local.generate(prompts, greedy)]
    finally:
        local.shutdown()
    config = EngineConfig.from_kwargs(model=target, draft_model=draft, **OPTIONS)
    with BackgroundServer(config, port=0) as srv, grpc.insecure_channel(srv.address) as ch:
        stub = pb_grpc.GenerationStub(ch)
        info = stub.GetModelInfo(pb.GetModelInfoRequest())
        assert (info.data_parallel_size, info.tensor_parallel_size,
                info.draft_tensor_parallel_size) == (2, 2, 1)
        replicas = srv.server.engine.replicas
        assert [len(r.engine.executor.workers) for r in replicas] == [2, 2]
        results = [None] * len(prompts)

        def run(i):
            results[i] = collect(stub, gen_request(prompts[i], greedy))[1]

        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert results == want
        assert all(r.num_steps > 0 for r in replicas)

        # Kill one rank of replica 0 while both replicas stream long requests.
        long = SamplingParams(max_tokens=400, temperature=0.0, ignore_eos=True)
        outcomes: dict[int, object] = {}
        started = threading.Barrier(5)

        def stream(i):
            call = stub.Generate(gen_request(prompts[i], long), timeout=120)
            tokens, first = [], True
            try:
                for resp in call:
                    tokens.extend(resp.token_ids)
                    if first:
                        first = False
                        started.wait()
                outcomes[i] = len(tokens)
            except grpc.RpcError as err:
                outcomes[i] = err
                if first:
                    started.wait()

        threads = [threading.Thread(target=stream, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        started.wait(timeout=60)
        assert all(r.num_unfinished == 2 for r in replicas)
        ray.kill(replicas[0].engine.executor.workers[1])
        for t in threads:
            t.join(timeout=120)
        failed = [o for o in outcomes.values() if isinstance(o, grpc.RpcError)]
        finished = [o for o in outcomes.values() if not isinstance(o, grpc.RpcError)]
        assert len(failed) == 2 and finished == [400, 400], outcomes
        for err in failed:
            assert err.code() == grpc.StatusCode.INTERNAL, err
            assert "rank 1 died" in err.details(), err.details()
        assert wait_until(lambda: replicas[1].stats.kv_blocks_used == 0)
