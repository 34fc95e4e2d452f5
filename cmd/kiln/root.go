package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"

	"github.com/spf13/cobra"

	"github.com/kiln-dev/kiln/internal/vmm"
)

// version is set with -ldflags "-X main.version=…".
var version = "dev"

// exitCode is returned by a verb that wants the process to exit with a
// status of its own (kiln run relays the guest command's status).
type exitCode int

func (e exitCode) Error() string { return fmt.Sprintf("exit status %d", int(e)) }

// app holds what every verb shares.
type app struct {
	stdin          io.Reader // nil: no input
	stdout, stderr io.Writer
	verbose        bool
}

func (a *app) logger() *slog.Logger {
	level := slog.LevelWarn
	if a.verbose {
		level = slog.LevelDebug
	}
	return slog.New(slog.NewTextHandler(a.stderr, &slog.HandlerOptions{Level: level}))
}

// accel detects the accelerator once and says so when it is TCG.
func (a *app) accel() vmm.Accel {
	acc, why := vmm.DetectAccel()
	if acc != vmm.KVM {
		fmt.Fprintln(a.stderr, "kiln:", why)
	}
	return acc
}

func (a *app) printJSON(v any) error {
	enc := json.NewEncoder(a.stdout)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}

func run(ctx context.Context, args []string, stdin io.Reader, stdout, stderr io.Writer) error {
	root := newRoot(&app{stdin: stdin, stdout: stdout, stderr: stderr})
	root.SetArgs(args)
	root.SetOut(stdout)
	root.SetErr(stderr)
	return root.ExecuteContext(ctx)
}

func newRoot(a *app) *cobra.Command {
	root := &cobra.Command{
		Use:   "kiln",
		Short: "Build Python unikernel images and run functions in them as microVMs",
		Long: `kiln packs a Python function's whole runtime (interpreter, standard library,
packages, native libraries, a kernel and a Go init) into ONE image file and
boots it as a single-purpose microVM on QEMU (KVM when available, TCG otherwise).`,
		SilenceUsage:  true,
		SilenceErrors: true,
	}
	root.PersistentFlags().BoolVarP(&a.verbose, "verbose", "v", false, "log debug details (guest console, VMM command lines) to stderr")
	groups := []struct {
		id, title string
		cmds      []*cobra.Command
	}{
		{"images", "Images:", []*cobra.Command{newBuildCmd(a), newInspectCmd(a), newKernelCmd(a)}},
		{"running", "Running:", []*cobra.Command{newRunCmd(a), newInvokeCmd(a), newSnapshotCmd(a)}},
		{"serving", "Serving:", []*cobra.Command{newServeCmd(a), newSubmitCmd(a), newResultCmd(a), newWorkerCmd(a), newWorkersCmd(a)}},
		{"experiments", "Experiments:", []*cobra.Command{newBenchCmd(a)}},
	}
	for _, g := range groups {
		root.AddGroup(&cobra.Group{ID: g.id, Title: g.title})
		for _, c := range g.cmds {
			c.GroupID = g.id
			root.AddCommand(c)
		}
	}
	root.AddCommand(newVersionCmd(a))
	return root
}
