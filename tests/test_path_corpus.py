"""A corpus of path forms judged by check_path against a temporary root.

Escapes (``..``, symlinks and their chains, dangling links, /proc and /dev/fd magic
links, prefix tricks) must be judged outside; names that only *look* like escapes
(percent-encoding, unicode dots, backslashes: the kernel takes them literally) must be
judged inside, where the kernel puts them.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from failcore_worker.rules import FsRule, Grants, check_path


@pytest.fixture
def root(tmp_path: Path) -> Iterator[Path]:
    base = Path(os.path.realpath(tmp_path))
    r, outside, sibling = base / "root", base / "outside", base / "rootx"
    for d in (r / "a" / "b" / "c", outside / "deep", sibling):
        d.mkdir(parents=True)
    (r / "a" / "f").write_text("in")
    (outside / "secret").write_text("out")
    (sibling / "secret").write_text("out")
    (r / "link_out").symlink_to(outside)
    (r / "chain1").symlink_to(r / "chain2")
    (r / "chain2").symlink_to(r / "chain3")
    (r / "chain3").symlink_to(outside / "secret")
    (r / "dangling").symlink_to(outside / "created-later")
    (r / "rel_up").symlink_to("../outside")
    (r / "a" / "uplink").symlink_to("../..")
    (r / "toroot").symlink_to("/")
    (r / "inlink").symlink_to(r / "a")
    (r / "deeplink").symlink_to(outside / "deep")
    (r / "loop1").symlink_to("loop2")
    (r / "loop2").symlink_to("loop1")
    yield r


def escapes(r: Path) -> list[str]:
    o = r.parent / "outside"
    name = r.name
    return [
        f"{r}/../outside/secret",
        f"{r}/a/../../outside/secret",
        f"{r}/./../outside/secret",
        f"{r}//..//outside//secret",
        f"{r}/a/b/../../../outside/secret",
        f"{r}/a/b/c/../../../../outside/secret",
        f"{r}/a/./././../../outside/secret",
        f"{r}/nonexistent/../../outside/secret",
        f"{r}/nonexistent/deeper/../../../outside/new",
        f"{r}/link_out/secret",
        f"{r}/link_out",
        f"{r}/link_out/",
        f"{r}/chain1",
        f"{r}/dangling",
        f"{r}/rel_up/secret",
        f"{r}/a/uplink/outside/secret",
        f"{r}/a/uplink",
        f"{r}/toroot/etc/passwd",
        f"{r}/deeplink/..",
        f"{r}/deeplink/../secret",
        f"{r}/../{name}/../outside/secret",
        f"{r}/../{name}x/secret",
        f"{r}x/secret",
        f"/proc/self/root{o}/secret",
        f"/proc/self/root/proc/self/root{r}/../outside/secret",
        "/proc/self/cwd/../../../../../../../../etc/passwd",
        "/proc/self/environ",
        "/proc/1/environ",
        "/etc/passwd",
        "/",
        f"{r}/a\0/../../outside",
        "",
    ]


def insides(r: Path) -> list[str]:
    return [
        f"{r}/a/f",
        f"{r}/a/../a/f",
        f"{r}//a//f",
        f"{r}/a/./f",
        f"{r}/a/",
        f"{r}/inlink/f",
        f"{r}/nonexistent/../a/f",
        f"{r}/%2e%2e/outside/secret",
        f"{r}/%2e%2e%2f%2e%2e%2foutside",
        f"{r}/\u2025/outside/secret",
        f"{r}/\uff0e\uff0e/outside/secret",
        f"{r}/a\\..\\..\\outside\\secret",
        f"{r}/...//outside",
        f"{r}/ ../outside",
        f"/proc/self/root{r}/a/f",
        f"{r}/new/dirs/file",
        f"{r}/a/uplink/root/a/f",
    ]


def grants(r: Path) -> Grants:
    return Grants(fs=(FsRule(str(r), True, f"fs:write:{r}"),), fs_root=str(r))


def test_corpus_size(root: Path) -> None:
    forms = escapes(root) + insides(root)
    assert len(set(forms)) == len(forms) and len(forms) >= 30
    assert (len(escapes(root)), len(insides(root))) == (32, 17)  # the parametrize ranges below


@pytest.mark.parametrize("index", range(32))
@pytest.mark.parametrize("write", [False, True])
def test_escapes_are_judged_outside(root: Path, index: int, write: bool) -> None:
    path = escapes(root)[index]
    verdict = check_path(grants(root), path, write)
    assert verdict.action == "block", (path, verdict)
    assert verdict.reason


@pytest.mark.parametrize("index", range(17))
def test_look_alikes_are_judged_where_the_kernel_puts_them(root: Path, index: int) -> None:
    path = insides(root)[index]
    assert check_path(grants(root), path, True).allowed, path


def test_relative_forms_join_the_cwd(root: Path) -> None:
    g = grants(root)
    assert check_path(g, "a/f", False, cwd=str(root)).allowed
    assert check_path(g, "~/x", True, cwd=str(root)).allowed  # no ~ expansion, like open()
    assert not check_path(g, "../outside/secret", False, cwd=str(root)).allowed
    assert not check_path(g, "link_out/secret", False, cwd=str(root)).allowed


def test_open_file_descriptor_links_resolve_to_their_file(root: Path) -> None:
    g = grants(root)
    outside = os.open(root.parent / "outside" / "secret", os.O_RDONLY)
    inside = os.open(root / "a" / "f", os.O_RDONLY)
    try:
        for template in ("/dev/fd/{}", "/proc/self/fd/{}"):
            assert not check_path(g, template.format(outside), False).allowed
            assert check_path(g, template.format(inside), False).allowed
    finally:
        os.close(outside)
        os.close(inside)


def test_symlink_loop_does_not_crash_or_escape(root: Path) -> None:
    verdict = check_path(grants(root), f"{root}/loop1/x", False)
    assert verdict.action in ("allow", "block")  # the kernel answers ELOOP either way


def test_dangling_link_created_later_is_judged_by_its_target(root: Path) -> None:
    g = grants(root)
    assert not check_path(g, f"{root}/dangling", True).allowed
    (root.parent / "outside" / "created-later").write_text("now it exists")
    assert not check_path(g, f"{root}/dangling", False).allowed


# --- layer 1: percent-encoded forms ----------------------------------------------------------
# The kernel takes "%2e%2e" literally (insides() above), but a tool may percent-decode its
# argument before opening it, so the pre-check judges every decoding and keeps the worse.


def encoded_escapes(r: Path) -> list[str]:
    return [
        f"{r}/%2e%2e/outside/secret",
        f"{r}/%2E%2E/outside/secret",
        f"{r}/%2e%2e%2foutside%2fsecret",
        f"{r}%2F%2E%2E%2Foutside%2Fsecret",
        f"{r}/%2e./outside/secret",
        f"{r}/.%2E/outside/secret",
        f"{r}/..%2foutside/secret",
        f"{r}/a/%2e%2e%5c%2e%2e%5coutside%5csecret",
        f"{r}/%252e%252e/outside/secret",
        f"{r}/%25252e%25252e%25252foutside/secret",
        f"{r}/a/%2e%2e/%2e%2e/outside/secret",
        f"file://{r}/%2e%2e/outside/secret",
        f"file://{r}/%252e%252e/outside/secret",
        "%2Fetc%2Fpasswd",
    ]


@pytest.mark.parametrize("index", range(14))
def test_layer1_judges_every_percent_decoding(root: Path, index: int) -> None:
    from failcore import presets

    policy = presets.fs_safe(root=str(root))
    g = policy.grants([f"fs:read:{root}"])
    form = encoded_escapes(root)[index]
    findings = policy.precheck(g, {"path": form})
    assert findings and findings[0][1].action == "block", (form, findings)
    assert findings[0][1].rule.startswith("fs_safe: outside"), findings


def test_layer1_keeps_literal_names_that_decode_inside(root: Path) -> None:
    """Decoding that stays inside, and overlong UTF-8 (``%c0%ae`` is U+FFFD to Python's
    decoder and a plain name to the kernel, never a dot), pass the pre-check."""
    from failcore import presets

    policy = presets.fs_safe(root=str(root))
    g = policy.grants([f"fs:read:{root}"])
    for form in (f"{root}/a/%66", f"{root}/%c0%ae%c0%ae/outside/secret",
                 f"{root}/%e0%80%ae%e0%80%ae/outside", f"{root}/100%/x"):
        assert policy.precheck(g, {"path": form}) == [], form


def test_a_session_refuses_an_encoded_traversal_before_dispatch(root: Path) -> None:
    from failcore import SecurityError, Session, SideEffect, ToolMetadata, presets

    def read(path: str) -> str:
        from urllib.parse import unquote

        with open(unquote(path)) as f:
            return f.read()

    with Session(validator=presets.fs_safe(root=str(root))) as s:
        s.register("read", read, ToolMetadata(side_effect=SideEffect.FILESYSTEM,
                                              capabilities=[f"fs:read:{root}"]))
        assert s.call("read", path=f"{root}/a/%66") == "in"
        with pytest.raises(SecurityError) as err:
            s.call("read", path=f"{root}/%2e%2e/outside/secret")
    assert err.value.layer == "precheck"
