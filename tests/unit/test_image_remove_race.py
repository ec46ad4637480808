"""RemoveImage against a CreateContainer of the same image (found by the fuzz campaign's
concurrent round: the creator's qemu-img found its backing file gone and the call answered
INTERNAL). The creator puts its record (the pin) and asks whether the image is stored
under the image's lock (holding); the remover asks in_use and deletes under the same lock,
so the creator either keeps the image or learns it is gone, whatever the interleaving."""

from __future__ import annotations

import threading

from arktos_vm_runtime.service.images import ImageStore
from tests.unit.test_image_store import Server, db, images, server, store  # noqa: F401


def test_a_creator_that_pins_first_keeps_the_image_or_learns_it_is_gone(
        store: ImageStore, server: Server) -> None:  # noqa: F811
    name = f"{server.host}/images/a.qcow2"
    rec = store.pull(name)
    pins: set[str] = set()
    seen: dict[str, bool] = {}

    def create_container() -> None:
        with store.holding(rec.digest):
            pins.add(rec.digest)  # the container record is put: image_in_use sees it from now
            seen["stored"] = store.status(rec.id) is not None

    creator = threading.Thread(target=create_container)

    def in_use(digest: str) -> bool:
        answer = digest in pins  # the pods' memory, read before the creator's pin
        creator.start()  # ... which pins and checks while this removal is deciding
        creator.join(0.5)
        return answer

    store.remove(name, in_use)
    creator.join(10)
    assert not creator.is_alive()
    assert "stored" in seen
    if seen["stored"]:
        assert rec.path.exists(), "the creator was told the image is stored; it is gone"
    else:
        assert not rec.path.exists() and store.status(rec.id) is None


def test_a_pinned_image_survives_a_removal_that_asks_after_the_pin(
        store: ImageStore, server: Server) -> None:  # noqa: F811
    name = f"{server.host}/images/a.qcow2"
    rec = store.pull(name)
    store.remove(name, lambda digest: digest == rec.digest)
    assert (store.status(rec.id) is not None) and rec.path.exists()
    store.remove(rec.id, lambda digest: False)
    assert not (store.status(rec.id) is not None) and not rec.path.exists()
