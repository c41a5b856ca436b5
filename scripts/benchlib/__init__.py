"""The modules of ``scripts/bench``: baselines, workloads, and the report.

Not part of the ``spoolops`` package.  Every system is measured through its
real parts in separate processes: a real ``spoolops worker`` on a real spool
tree, real ``spoolops.Client`` objects in client processes, and baselines
(``floor``, ``oldhttp``, ``dbpoll``, ``astropy_way``) that run as their own
server and client processes the same way.

Trusts: everything here runs on throw-away trees the bench creates itself.
"""
