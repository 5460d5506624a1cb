"""Config: the precedence of sources, units, and errors that name the key."""

from __future__ import annotations

import pytest

from store.config import ConfigError, StoreConfig, all_keys, env_var, parse_size


def test_defaults_are_valid():
    c = StoreConfig()
    assert c.tiers == ["cpu"] and c.chunk_size == 256 and c.write_policy == "write_through"
    assert c.cpu.size == 4 * 2**30 and c.cpu.verify is False and c.disk.verify is True


@pytest.mark.parametrize(
    "text,expected",
    [
        ("4096", 4096),
        ("64KiB", 65536),
        ("8GiB", 8 * 2**30),
        ("1GB", 10**9),
        ("1.5MiB", 1572864),
        (512, 512),
    ],
)
def test_sizes_take_units(text, expected):
    assert parse_size(text) == expected


def test_yaml_then_env_then_overrides(tmp_path):
    path = tmp_path / "kv.yaml"
    path.write_text(
        "tiers: [cpu, disk]\ncpu:\n  size: 1GiB\n  policy: lru\ndisk:\n  path: /x\n  size: 2GiB\n"
    )
    env = {"KVSTORE_CPU_SIZE": "512MiB", "KVSTORE_DISK_FSYNC": "false", "UNRELATED": "1"}
    c = StoreConfig.load(
        str(path), env=env, overrides={"disk.size": "3GiB", "write_policy": "write_back"}
    )
    assert c.tiers == ["cpu", "disk"]
    assert c.cpu.size == 512 * 2**20 and c.cpu.policy == "lru"
    assert c.disk.path == "/x" and c.disk.size == 3 * 2**30 and c.disk.fsync is False
    assert c.write_policy_of("disk") == "write_back"


def test_per_tier_write_policy_overrides_the_store_default():
    c = StoreConfig.load(
        env={}, overrides={"tiers": "cpu,disk,redis", "redis.write_policy": "write_back"}
    )
    assert (
        c.write_policy_of("disk") == "write_through" and c.write_policy_of("redis") == "write_back"
    )


def test_every_key_has_an_env_var():
    assert env_var("cpu.size") == "KVSTORE_CPU_SIZE"
    assert env_var("redis.url") == "KVSTORE_REDIS_URL"
    assert len(all_keys()) == len(set(all_keys()))


@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"tiers": "cpu,tape"}, "tiers: 'tape' is not one of gpu, cpu, disk, gds, redis"),
        ({"tiers": "cpu,cpu"}, "lists a tier twice"),
        ({"cpu.size": "lots"}, "cpu.size: 'lots' is not a size"),
        ({"cpu.size": "0"}, "cpu.size: size must be positive"),
        (
            {"write_policy": "sometimes"},
            "write_policy: 'sometimes' is not one of write_through, write_back",
        ),
        ({"disk.policy": "mru"}, "disk.policy: 'mru' is not one of s3fifo, lru"),
        ({"redis.url": "http://h"}, "redis.url: redis url 'http://h': scheme must be one of"),
        ({"redis.timeout": "-1"}, "redis.timeout: must be a positive number"),
        ({"chunk_size": "many"}, "chunk_size: expected an integer"),
        ({"disk.fsync": "maybe"}, "disk.fsync: expected true or false"),
        ({"cpu.page_size": "8GiB"}, "cpu.page_size (8589934592) exceeds cpu.size"),
        ({"cpu.sise": "1"}, "cpu.sise: unknown key"),
    ],
)
def test_errors_name_the_key_and_what_is_allowed(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        StoreConfig.load(env={}, overrides=overrides)


def test_bad_yaml_file_is_a_config_error(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        StoreConfig.load(str(path), env={})
    with pytest.raises(ConfigError, match="No such file"):
        StoreConfig.load(str(tmp_path / "missing.yaml"), env={})


def test_docs_table_lists_every_key_and_env_var():
    import pathlib

    doc = (pathlib.Path(__file__).parent.parent / "docs" / "store.md").read_text()
    missing = [k for k in all_keys() if f"| `{k}` |" not in doc or f"`{env_var(k)}`" not in doc]
    assert missing == []
