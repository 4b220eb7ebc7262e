"""The kubelet plugin end to end over real Unix sockets and a real HTTP API server.

Covers: registration (GetInfo contents, DRA socket up first, refused registration), prepare and
unprepare on v1 and v1beta1, CDI specs a runtime would load, per-claim errors (not found, UID
mismatch, unallocated, other driver or pool, bad opaque config, invalid UID), idempotent
prepare, unprepare of unknown claims, restart between prepare and unprepare, exclusivity, and
50 concurrent claims.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path

import pytest

from driver import cdi, daemon
from driver.checkpoint import CheckpointStore
from driver.demo.apiserver import ApiServer as FakeApiServer
from driver.errors import FatalError
from driver.kubelet import client as kubelet
from driver.locks import FileLocks
from support.cdi_validator import validate
from support.claims import allocated_claim, env_config, result
from support.waiting import wait_until

POOL = "node-a"
GPU0, GPU1, GPU2 = "gpu-0000-1b-00-0", "gpu-0000-43-00-0", "gpu-0000-52-00-0"


def checkpoint_of(node) -> dict:  # type: ignore[no-untyped-def]
    store = CheckpointStore(
        node.plugin_dir / "checkpoint.json", FileLocks(node.plugin_dir / "serialize.lock")
    )
    return store.read().claims


def spec_of(node, uid: str) -> dict:  # type: ignore[no-untyped-def]
    return json.loads((node.cdi_root / cdi.spec_filename("unidra.dev", uid)).read_text())


def test_registration_advertises_both_dra_versions_v1_first(running, node) -> None:
    instance, plugin = running
    assert plugin.info.type == "DRAPlugin"
    assert plugin.info.name == "unidra.dev"
    assert plugin.info.endpoint == str(node.plugin_dir / "dra.sock")
    assert list(plugin.info.supported_versions) == [
        "v1.DRAPlugin",
        "v1beta1.DRAPlugin",
        "v1alpha1.DRAResourceHealth",
        "v1.DRAResourceHealth",
    ]
    assert plugin.service == "v1.DRAPlugin"
    assert instance.registration.registered is True
    assert plugin.registration_socket == node.registrar_dir / "unidra.dev-reg.sock"


def test_start_reports_the_api_server_version(node, caplog) -> None:
    caplog.set_level(logging.INFO)
    instance = daemon.start(node.settings())
    instance.stop()
    record = next(r for r in caplog.records if r.getMessage() == "API server")
    assert record.__dict__["version"] == "v1.35.0-fake"
    assert record.__dict__["resource_k8s_io"] == ["v1"]


def test_dra_socket_answers_as_soon_as_registration_socket_exists(running) -> None:
    _, plugin = running
    # An empty request is what liveness probes send: an empty map, no error.
    assert plugin.prepare([]) == {}
    assert plugin.unprepare([]) == {}


def test_refused_registration_is_logged_as_error(running, caplog) -> None:
    instance, plugin = running
    caplog.set_level(logging.ERROR)
    import grpc

    from driver.kubelet.gen.pluginregistration.v1 import api_pb2, api_pb2_grpc

    with grpc.insecure_channel(f"unix://{plugin.registration_socket}") as channel:
        api_pb2_grpc.RegistrationStub(channel).NotifyRegistrationStatus(
            api_pb2.RegistrationStatus(plugin_registered=False, error="version mismatch"), timeout=5
        )
    assert instance.registration.registered is False
    assert instance.registration.error == "version mismatch"
    assert any(
        "refused" in r.getMessage() and r.__dict__.get("error") == "version mismatch"
        for r in caplog.records
    )


@pytest.mark.parametrize("service", ["v1.DRAPlugin", "v1beta1.DRAPlugin"])
def test_prepare_and_unprepare_happy_path(running, node, api: FakeApiServer, service: str) -> None:
    _, plugin = running
    claim = allocated_claim(
        api, "train", [result(GPU0, POOL, "gpu/big"), result(GPU1, POOL, "gpu/big")]
    )
    uid = claim[2]

    answer = plugin.prepare([claim], service=service)

    assert answer[uid].error == ""
    devices = answer[uid].devices
    assert [d["deviceName"] for d in devices] == [GPU0, GPU1]
    assert all(d["poolName"] == POOL and d["requestNames"] == ["gpu"] for d in devices)
    spec = spec_of(node, uid)
    validate(spec)
    assert spec["kind"] == "k8s.unidra.dev/claim"
    names = {f"k8s.unidra.dev/claim={d['name']}" for d in spec["devices"]}
    assert {i for d in devices for i in d["cdiDeviceIDs"]} == names
    assert {d["name"] for d in spec["devices"]} == {f"{uid}-{GPU0}", f"{uid}-{GPU1}"}
    nodes = [n["path"] for d in spec["devices"] for n in d["containerEdits"]["deviceNodes"]]
    assert nodes == ["/dev/nvidia0", "/dev/nvidia1"]
    assert {n["path"] for n in spec["containerEdits"]["deviceNodes"]} >= {
        "/dev/nvidiactl",
        "/dev/nvidia-uvm",
    }
    assert [d.device for d in checkpoint_of(node)[uid].devices] == [GPU0, GPU1]

    assert plugin.unprepare([claim], service=service)[uid].error == ""
    assert not (node.cdi_root / cdi.spec_filename("unidra.dev", uid)).exists()
    assert uid not in checkpoint_of(node)


def test_every_claim_gets_its_own_answer_and_errors_stay_per_claim(
    running, api: FakeApiServer
) -> None:
    _, plugin = running
    good = allocated_claim(api, "good", [result(GPU0, POOL)])
    missing = ("default", "ghost", "0b7c6d1e-0000-4000-8000-000000000001")
    unallocated = allocated_claim(api, "pending", [], allocated=False)
    other_pool = allocated_claim(api, "elsewhere", [result(GPU1, "node-b")])
    other_driver = allocated_claim(api, "foreign", [result("gpu-0", POOL, driver="gpu.nvidia.com")])
    unknown_device = allocated_claim(api, "unknown", [result("gpu-0000-ff-00-0", POOL)])

    answer = plugin.prepare([good, missing, unallocated, other_pool, other_driver, unknown_device])

    assert answer[good[2]].error == "" and len(answer[good[2]].devices) == 1
    assert "not found" in answer[missing[2]].error
    assert "is not allocated" in answer[unallocated[2]].error
    assert "no devices of driver unidra.dev in pool node-a" in answer[other_pool[2]].error
    assert "unidra.dev/node-b" in answer[other_pool[2]].error
    assert "gpu.nvidia.com/node-a" in answer[other_driver[2]].error
    assert "gpu-0000-ff-00-0" in answer[unknown_device[2]].error
    assert all(
        answer[c[2]].devices == []
        for c in (missing, unallocated, other_pool, other_driver, unknown_device)
    )


def test_uid_mismatch_means_the_claim_was_replaced(running, api: FakeApiServer) -> None:
    _, plugin = running
    namespace, name, _ = allocated_claim(api, "replaced", [result(GPU0, POOL)])
    stale_uid = "3f0e6c8a-1111-4222-8333-444455556666"
    answer = plugin.prepare([(namespace, name, stale_uid)])
    assert "UID" in answer[stale_uid].error and "recreated" in answer[stale_uid].error


def test_invalid_claim_uid_is_refused_before_touching_disk(running, node) -> None:
    _, plugin = running
    answer = plugin.prepare([("default", "evil", "../../etc/passwd")])
    assert "invalid UID" in answer["../../etc/passwd"].error
    assert not list(node.cdi_root.iterdir())


def test_malformed_opaque_config_names_the_field(running, api: FakeApiServer) -> None:
    _, plugin = running
    bad = env_config({"1BAD": "x"})
    claim = allocated_claim(api, "bad-config", [result(GPU0, POOL)], config=[bad])
    error = plugin.prepare([claim])[claim[2]].error
    assert "status.allocation.devices.config[0].opaque.parameters.env['1BAD']" in error
    typo = env_config({})
    typo["opaque"]["parameters"]["evn"] = {}
    claim2 = allocated_claim(api, "typo-config", [result(GPU1, POOL)], config=[typo])
    assert "opaque.parameters.evn: unknown field" in plugin.prepare([claim2])[claim2[2]].error


def test_opaque_config_class_then_claim_later_wins_other_drivers_ignored(
    running, node, api: FakeApiServer
) -> None:
    _, plugin = running
    config = [
        env_config({"NCCL_DEBUG": "INFO", "FROM": "claim"}, source="FromClaim"),
        env_config({"NCCL_DEBUG": "WARN", "FROM": "class", "CLASS_ONLY": "1"}, source="FromClass"),
        env_config({"IGNORED": "1"}, driver="gpu.nvidia.com"),
        env_config({"OTHER_REQUEST": "1"}, requests=["nic"]),
    ]
    claim = allocated_claim(api, "configured", [result(GPU0, POOL)], config=config)
    assert plugin.prepare([claim])[claim[2]].error == ""
    env = spec_of(node, claim[2])["devices"][0]["containerEdits"]["env"]
    assert "NCCL_DEBUG=INFO" in env and "FROM=claim" in env and "CLASS_ONLY=1" in env
    assert not any(item.startswith(("IGNORED", "OTHER_REQUEST")) for item in env)


def test_prepare_twice_returns_the_same_answer_without_side_effects(
    running, node, api: FakeApiServer
) -> None:
    instance, plugin = running
    claim = allocated_claim(api, "twice", [result(GPU0, POOL)])
    first = plugin.prepare([claim])
    spec_file = node.cdi_root / cdi.spec_filename("unidra.dev", claim[2])
    written = spec_file.stat().st_mtime_ns
    wait_until(lambda: instance.status.writes == 1, what="the claim's device status")
    requests_before = len(api.requests)

    second = plugin.prepare([claim])

    assert second == first
    assert spec_file.stat().st_mtime_ns == written
    time.sleep(0.3)  # give a (wrong) status write the time to show up
    claim_calls = [r for r in api.requests[requests_before:] if "/resourceclaims" in r.path]
    assert claim_calls == []  # answered from the checkpoint: no claim GET, no status write


def test_unprepare_of_unknown_claim_succeeds(running) -> None:
    _, plugin = running
    uid = "5e2d9a70-aaaa-4bbb-8ccc-dddddddddddd"
    assert plugin.unprepare([("default", "never", uid)])[uid].error == ""


def test_unprepare_works_after_claim_deleted_and_driver_restarted(node, api: FakeApiServer) -> None:
    first = daemon.start(node.settings())
    plugin = kubelet.wait_for_registration(node.registrar_dir)
    claim = allocated_claim(api, "survivor", [result(GPU2, POOL)])
    prepared = plugin.prepare([claim])
    plugin.close()
    first.stop()
    api.delete("resource.k8s.io", "resourceclaims", "survivor", "default")

    second = daemon.start(node.settings())
    try:
        plugin = kubelet.wait_for_registration(node.registrar_dir)
        assert plugin.prepare([claim]) == prepared  # still prepared: answered from the checkpoint
        assert plugin.unprepare([claim])[claim[2]].error == ""
        assert not (node.cdi_root / cdi.spec_filename("unidra.dev", claim[2])).exists()
        plugin.close()
    finally:
        second.stop()


def test_a_device_prepared_for_one_claim_is_refused_to_another(running, api: FakeApiServer) -> None:
    _, plugin = running
    owner = allocated_claim(api, "owner", [result(GPU0, POOL)])
    intruder = allocated_claim(api, "intruder", [result(GPU0, POOL)])
    monitor = allocated_claim(api, "monitor", [result(GPU0, POOL, adminAccess=True)])
    assert plugin.prepare([owner])[owner[2]].error == ""

    answer = plugin.prepare([intruder, monitor])

    assert "already prepared for claim default/owner" in answer[intruder[2]].error
    assert answer[monitor[2]].error == ""  # admin access never owns a device
    plugin.unprepare([owner])
    assert plugin.prepare([intruder])[intruder[2]].error == ""


def test_shared_allocations_with_share_ids_coexist(running, node, api: FakeApiServer) -> None:
    _, plugin = running
    share_a, share_b = (
        "11111111-2222-4333-8444-555555555555",
        "66666666-7777-4888-9999-000000000000",
    )
    # As the 1.36 scheduler writes shares; a share without consumedCapacity holds the whole GPU.
    used = {"memory": "30Gi", "computeUnits": "0"}
    a = allocated_claim(
        api, "share-a", [result(GPU0, POOL, shareID=share_a, consumedCapacity=used)]
    )
    b = allocated_claim(
        api, "share-b", [result(GPU0, POOL, shareID=share_b, consumedCapacity=used)]
    )
    answer = plugin.prepare([a, b])
    assert answer[a[2]].error == "" and answer[b[2]].error == ""
    assert answer[a[2]].devices[0]["shareID"] == share_a
    assert spec_of(node, b[2])["devices"][0]["name"] == f"{b[2]}-{GPU0}-{share_b}"


def test_stale_socket_from_a_crash_is_replaced(node) -> None:
    import socket as pysocket

    node.registrar_dir.mkdir(parents=True)
    stale = pysocket.socket(pysocket.AF_UNIX)
    stale.bind(str(node.registrar_dir / "unidra.dev-reg.sock"))
    stale.close()  # the file stays, nobody listens: what kill -9 leaves behind
    instance = daemon.start(node.settings())
    try:
        plugin = kubelet.wait_for_registration(node.registrar_dir)
        assert plugin.prepare([]) == {}
        plugin.close()
    finally:
        instance.stop()
    assert not (node.registrar_dir / "unidra.dev-reg.sock").exists()
    assert not (node.plugin_dir / "dra.sock").exists()


def test_a_non_socket_in_the_way_is_a_clear_fatal_error(node) -> None:
    node.registrar_dir.mkdir(parents=True)
    (node.registrar_dir / "unidra.dev-reg.sock").write_text("not a socket")
    with pytest.raises(FatalError, match="exists and is not a socket"):
        daemon.start(node.settings())
    assert not (
        node.plugin_dir / "dra.sock"
    ).exists()  # the DRA server started first was stopped again


def test_fifty_concurrent_claims(node, api: FakeApiServer, short_tmp: Path) -> None:
    instances = "\n".join(
        f'      - {{pciBusID: "0000:{bus:02x}:00.0", numaNode: {bus % 2}}}' for bus in range(1, 65)
    )
    profile = short_tmp / "big.yaml"
    profile.write_text(
        f"description: 64 GPUs\ndevices:\n  - model: h100-sxm5-80gb\n    instances:\n{instances}\n"
    )
    instance = daemon.start(node.settings(profile=str(profile)))
    plugin = kubelet.wait_for_registration(node.registrar_dir)
    claims = [
        allocated_claim(api, f"c{i}", [result(f"gpu-0000-{i + 1:02x}-00-0", POOL)])
        for i in range(50)
    ]
    errors: list[str] = []

    def cycle(claim: tuple[str, str, str]) -> None:
        answer = plugin.prepare([claim])[claim[2]]
        if answer.error or len(answer.devices) != 1:
            errors.append(answer.error or "no device")

    try:
        threads = [threading.Thread(target=cycle, args=(c,)) for c in claims]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert errors == []
        assert len(checkpoint_of(node)) == 50
        assert len(cdi.claim_specs(node.cdi_root, "unidra.dev")) == 50
        unprepare = [threading.Thread(target=plugin.unprepare, args=([c],)) for c in claims]
        for thread in unprepare:
            thread.start()
        for thread in unprepare:
            thread.join()
        assert checkpoint_of(node) == {}
        assert cdi.claim_specs(node.cdi_root, "unidra.dev") == {}
    finally:
        plugin.close()
        instance.stop()


def test_daemon_publishes_its_pool_and_prepares_mig_partitions(node, api: FakeApiServer) -> None:
    instance = daemon.start(node.settings(partitions=True))
    try:
        plugin = kubelet.wait_for_registration(node.registrar_dir)

        def published_devices() -> int:
            items = api.list("resource.k8s.io", "resourceslices")
            return sum(len(s["spec"].get("devices") or []) for s in items)

        wait_until(lambda: published_devices() == 208, what="the dgx-h100 pool with MIG partitions")
        mig = "gpu-0000-1b-00-0-mig-3g40gb-4"
        claim = allocated_claim(api, "slice", [result(mig, POOL, "gpu")])
        answer = plugin.prepare([claim])[claim[2]]
        assert answer.error == ""
        assert answer.devices[0]["deviceName"] == mig
        spec = spec_of(node, claim[2])
        validate(spec)
        nodes = [n["path"] for n in spec["devices"][0]["containerEdits"]["deviceNodes"]]
        assert nodes[0] == "/dev/nvidia0" and all(
            p.startswith("/dev/nvidia-caps/") for p in nodes[1:]
        )
        assert len(nodes) == 3
        plugin.close()
    finally:
        instance.stop()


def test_partition_names_are_refused_without_partitions(running, api: FakeApiServer) -> None:
    _, plugin = running
    claim = allocated_claim(api, "no-mig", [result("gpu-0000-1b-00-0-mig-3g40gb-4", POOL)])
    assert (
        "partitions are published only with --partitions" in plugin.prepare([claim])[claim[2]].error
    )


def test_a_device_listed_twice_in_one_claim_is_refused(running, node, api: FakeApiServer) -> None:  # type: ignore[no-untyped-def]
    _, plugin = running
    claim = allocated_claim(
        api, "twice", [result(GPU0, POOL, request="a"), result(GPU0, POOL, request="b")]
    )
    answer = plugin.prepare([claim])[claim[2]]
    assert answer.error == (
        "claim default/twice lists device gpu-0000-1b-00-0 twice (requests a and b); "
        "a device is allocated at most once per claim"
    )
    assert claim[2] not in checkpoint_of(node)
    assert cdi.claim_specs(node.cdi_root, "unidra.dev") == {}


def test_huge_names_and_uids_are_cut_in_errors_and_logs(  # type: ignore[no-untyped-def]
    running, caplog: pytest.LogCaptureFixture
) -> None:
    _, plugin = running
    huge = [
        ("n" * 100_000, "c" * 100_000, "5e2d9a70-aaaa-4bbb-8ccc-dddddddddddd"),
        ("default", "c" * 100_000, "u" * 100_000),
    ]
    with caplog.at_level(logging.INFO):
        answers = plugin.prepare(huge)
    assert all(answer.error and len(answer.error) < 1500 for answer in answers.values()), answers
    assert "c" * 253 + "...(+99747 characters)" in answers[huge[0][2]].error
    assert answers[huge[1][2]].error.endswith(
        "has an invalid UID '" + "u" * 36 + "...(+99964 characters)'"
    )
    lines = [record.getMessage() + repr(record.__dict__) for record in caplog.records]
    assert lines and max(len(line) for line in lines) < 5000
