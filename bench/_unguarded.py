"""`normals-pipeline` with every cross-process guarantee taken out: `python _unguarded.py run ARGS...`.

Figure 6's price of the guarantees. No rate turn or credit lease (the rate guard grants at once and forgets),
claims in this process's memory, no journal: what is left is the pipeline's own work per image (read, hash and
check the file, the exchange with its retries, the map stored durably, the row), in the same run shape through
the same Dagster definitions. A measuring instrument only: such a run can overspend a key and send a duplicate
twice across processes, so nothing but the bench runs it.
"""

import dataclasses
import itertools
import sys

from normals_pipeline import _state, cli, enrich, guards, settings

_turns = itertools.count()


def _unguarded() -> None:
    guards.RateGuard.acquire = lambda self, *args, **kwargs: f"unguarded-{next(_turns)}"
    guards.RateGuard.finished = lambda self, *args, **kwargs: None
    guards.SQLiteState = lambda folder, fingerprint: _state.MemoryState()
    claims = _state.MemoryClaims()
    guards.claim_store = settings.claim_store = lambda *args, **kwargs: claims  # the names the CLI and resources call
    journaled = enrich.Enricher._process_and_journal
    enrich.Enricher._process_and_journal = lambda self, work, item: journaled(
        self, dataclasses.replace(work, journal=None), item
    )


if __name__ == "__main__":
    _unguarded()
    sys.argv[0] = "normals-pipeline"
    cli.console()
