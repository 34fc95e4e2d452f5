// Package archtest holds the tests that keep the repository's layout rules: every package has a doc comment, and PID 1 stays within its dependency budget.
package archtest
