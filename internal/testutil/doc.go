// Package testutil holds the helpers that the tests of several packages
// share: a buffer safe for concurrent use, polling for a condition, a
// pseudo-terminal, and guest machine code for the tiny test kernels. Only
// tests import it; it must not grow product logic.
package testutil
