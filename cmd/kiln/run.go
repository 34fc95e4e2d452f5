package main

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/spf13/cobra"

	"github.com/kiln-dev/kiln/internal/guest/proto"
	"github.com/kiln-dev/kiln/internal/image"
	"github.com/kiln-dev/kiln/internal/launch"
	"github.com/kiln-dev/kiln/internal/sandbox"
	"github.com/kiln-dev/kiln/internal/spec"
)

// vmFlags are the VM sizing flags shared by run and invoke.
type vmFlags struct {
	memory string
	vcpus  int
}

func (v *vmFlags) add(cmd *cobra.Command) {
	cmd.Flags().StringVar(&v.memory, "memory", "", "guest memory, e.g. 1G (default: the image's)")
	cmd.Flags().IntVar(&v.vcpus, "vcpus", 0, "guest vCPUs (default: the image's)")
}

func (v *vmFlags) options(a *app) (launch.Options, error) {
	o := launch.Options{VCPUs: v.vcpus, Log: a.logger(), Accel: a.accel()}
	if v.memory != "" {
		n, err := spec.ParseSize(v.memory)
		if err != nil {
			return o, fmt.Errorf("--memory: %w", err)
		}
		o.MemoryMiB = int(n >> 20)
	}
	if v.vcpus < 0 {
		return o, errors.New("--vcpus must be positive")
	}
	return o, nil
}

func newRunCmd(a *app) *cobra.Command {
	var vf vmFlags
	var timeout time.Duration
	var timings, asJSON, cold bool
	cmd := &cobra.Command{
		Use:   "run IMAGE [-- CMD ARGS...]",
		Short: "Boot an image as a microVM and run a command in it",
		Long: `Run starts IMAGE on QEMU (KVM when /dev/kvm is usable, TCG otherwise), runs
the command (default: the spec's command) with the image's environment,
relays its stdout and stderr, and exits with its status. The VM is killed
and temporary files removed on timeout, Ctrl-C and errors.

By default the VM is restored from a snapshot of the image booted with its
preload modules imported (created on first use, see kiln snapshot), and
python3 -c/-m/script commands run in a fork of kiln's agent, so those
modules are already imported; the output arrives when the command exits.
--cold boots the kernel instead and streams the output as it is written.`,
		Example: `  kiln run numpy.kimg -- python3 -c "import numpy; print(numpy.arange(10).sum())"
  kiln run numpy.kimg --timings --memory 1G -- python3 -m app
  kiln run numpy.kimg --timeout 30s
  kiln run numpy.kimg --cold --timings -- python3 -c "import numpy"`,
		Args: cobra.MinimumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			o, err := vf.options(a)
			if err != nil {
				return err
			}
			img, err := launch.Open(args[0])
			if err != nil {
				return err
			}
			argv := args[1:]
			if len(argv) == 0 {
				argv = img.Manifest.Command
			}
			if len(argv) == 0 {
				return errors.New("no command: give one after -- (kiln run IMAGE -- python3 -c '…') or set command in kiln.toml")
			}
			ctx := cmd.Context()
			if timeout > 0 {
				var cancel context.CancelFunc
				ctx, cancel = context.WithTimeout(ctx, timeout)
				defer cancel()
			}
			var exit launch.Exit
			if cold {
				exit, err = runCold(ctx, a, img, argv, o, timings || asJSON, asJSON)
			} else {
				exit, err = runWarm(ctx, a, args[0], argv, o, timeout, timings || asJSON, asJSON)
			}
			if err != nil {
				if errors.Is(err, context.DeadlineExceeded) || errors.Is(err, sandbox.ErrTimeout) {
					return fmt.Errorf("timeout after %s: the VM was killed", timeout)
				}
				return err
			}
			if exit.Error != "" {
				fmt.Fprintln(a.stderr, "kiln:", exit.Error)
			}
			if exit.OOM {
				fmt.Fprintln(a.stderr, "kiln: the guest ran out of memory (the kernel's OOM killer struck); try --memory")
			}
			if exit.Code != 0 {
				if exit.Code < 0 {
					return exitCode(1)
				}
				return exitCode(exit.Code)
			}
			return nil
		},
	}
	vf.add(cmd)
	cmd.Flags().DurationVar(&timeout, "timeout", 0, "kill the VM after this long (e.g. 30s; default: no limit)")
	cmd.Flags().BoolVar(&timings, "timings", false, "print boot phases to stderr: VMM start → kernel → init → rootfs → command started → exited")
	cmd.Flags().BoolVar(&asJSON, "json", false, "print the timings as JSON to stderr")
	cmd.Flags().BoolVar(&cold, "cold", false, "cold-boot instead of restoring a snapshot (streams output while the command runs)")
	return cmd
}

func printTimings(a *app, t launch.Timings, asJSON bool) {
	if asJSON {
		ms := map[string]float64{}
		for _, p := range t.Phases() {
			ms[p.Name+"_ms"] = float64(p.Since.Microseconds()) / 1000
		}
		(&app{stdout: a.stderr}).printJSON(ms)
		return
	}
	fmt.Fprintln(a.stderr, "timings (since kiln started the VMM):")
	var prev time.Duration
	for _, p := range t.Phases() {
		fmt.Fprintf(a.stderr, "  %-16s %8.3fs  (+%.3fs)\n", p.Name, p.Since.Seconds(), (p.Since - prev).Seconds())
		prev = p.Since
	}
}

// runCold boots the kernel and streams the command's output.
func runCold(ctx context.Context, a *app, img *image.Image, argv []string, o launch.Options, timings, asJSON bool) (launch.Exit, error) {
	vm, err := launch.Boot(ctx, img, proto.RunConfig{Mode: proto.ModeRun, Argv: argv, Env: img.Manifest.Env, Hostname: img.Manifest.Name}, o)
	if err != nil {
		return launch.Exit{}, err
	}
	defer vm.Close()
	exit, err := vm.RunCommand(ctx, a.stdout, a.stderr)
	vm.Close()
	if timings {
		printTimings(a, vm.Timings, asJSON)
	}
	return exit, err
}

// runWarm restores (or creates) the image's snapshot and runs the command in
// the warm guest.
func runWarm(ctx context.Context, a *app, path string, argv []string, o launch.Options, timeout time.Duration, timings, asJSON bool) (launch.Exit, error) {
	if timeout == 0 {
		timeout = 365 * 24 * time.Hour // kiln run has no limit unless --timeout
	}
	sb, err := sandbox.Start(ctx, path, sandbox.Options{Launch: o, Timeout: timeout})
	if err != nil {
		return launch.Exit{}, err
	}
	defer sb.Close()
	res, err := sb.Run(ctx, argv, nil)
	if timings {
		printTimings(a, sb.Timings(), asJSON)
	}
	if err != nil {
		return launch.Exit{}, err
	}
	a.stdout.Write(res.Stdout)
	a.stderr.Write(res.Stderr)
	if res.StdoutTruncated || res.StderrTruncated {
		fmt.Fprintln(a.stderr, "kiln: output truncated; use --cold to stream it")
	}
	return launch.Exit{Code: res.Code}, nil
}
