"""A flow run that fails without writing its exception to Prefect's result storage.

Prefect 3.9's flow engine pickles the exception of a failed flow run into the result storage
(``PREFECT_LOCAL_STORAGE_PATH``: ``~/.prefect/storage``) whatever ``persist_result`` says
(``FlowRunEngine.handle_exception`` passes ``write_result=True``): every failed nightly run
would leave a file there that nothing reads or deletes. A flow body that catches the exception
and *returns* :func:`failed_state` instead ends in the same ``Failed`` state, with the same
message, and the caller of the flow function still gets the exception raised; with
``persist_result=False`` on the flow nothing is written.
"""

from __future__ import annotations

from prefect.states import Failed, State

from recsys_metric.errors import is_transient


def failed_state(exc: BaseException) -> State:
    """The ``Failed`` state Prefect would give a flow run that raised ``exc``, without storage.

    The message reads as Prefect's own (``Flow run encountered an exception: DataError: ...``)
    and says whether the failure was transient (worth a retry by the scheduler) or not.
    """
    kind = "transient; a later run may succeed" if is_transient(exc) else "not transient"
    return Failed(
        message=f"Flow run encountered an exception: {type(exc).__name__}: {exc} ({kind})",
        data=exc,
    )
