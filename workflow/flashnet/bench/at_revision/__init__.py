"""Worker scripts that bench/revision.py runs by path, in a process whose ``flashnet`` is another
git revision: each imports only that revision's modules and installed libraries, never this
package's, and answers the benchmark one JSON line per request on stdout."""
