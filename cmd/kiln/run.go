package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"time"

	"github.com/spf13/cobra"
	"golang.org/x/term"

	"github.com/kiln-dev/kiln/internal/guest/proto"
	"github.com/kiln-dev/kiln/internal/image"
	"github.com/kiln-dev/kiln/internal/sandbox"
	"github.com/kiln-dev/kiln/internal/size"
	"github.com/kiln-dev/kiln/internal/vm"
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

func (v *vmFlags) options(a *app) (vm.Config, error) {
	o := vm.Config{VCPUs: v.vcpus, Log: a.logger(), Accel: a.accel()}
	if v.memory != "" {
		n, err := size.Parse(v.memory)
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
	var vols volumeFlags
	var timeout time.Duration
	var timings, asJSON, cold, interactive bool
	cmd := &cobra.Command{
		Use:   "run IMAGE [-- CMD ARGS...]",
		Short: "Boot an image as a microVM and run a command in it",
		Long: `Run starts IMAGE on QEMU (KVM when /dev/kvm is usable, TCG otherwise), runs
the command (default: the spec's command) with the image's environment,
streams its stdout and stderr as they are written, and exits with its
status (128+N when signal N killed it). Stdin is forwarded to the command
until it ends; when stdin is a terminal the command gets /dev/null unless
-i/--interactive is given, as with docker run. The VM is killed and
temporary files removed on timeout, Ctrl-C (exit 130), SIGTERM (exit 143)
and errors.

By default the VM is restored from a snapshot of the image booted with its
preload modules imported (created on first use, see kiln snapshot), and
python3 -c/-m/script commands run in a fork of kiln's agent, so those
modules are already imported. --cold boots the kernel instead.

--volume HOST:GUEST shares a host directory (read-only; :rw to write,
files then belong to the user running kiln) at GUEST, in both modes.`,
		Example: `  kiln run numpy.kimg -- python3 -c "import numpy; print(numpy.arange(10).sum())"
  kiln run numpy.kimg --timings --memory 1G -- python3 -m app
  printf 'a\nb\n' | kiln run numpy.kimg -- python3 -c "import sys; print(len(sys.stdin.read().split()))"
  kiln run -i numpy.kimg -- python3 -c "print(input('name? '))"
  kiln run numpy.kimg --volume ./data:/data -- python3 -c "print(open('/data/x.csv').read())"
  kiln run numpy.kimg --volume ./in:/in --volume ./out:/out:rw -- python3 -m app
  kiln run numpy.kimg --timeout 30s
  kiln run numpy.kimg --cold --timings -- python3 -c "import numpy"`,
		Args: cobra.MinimumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			o, err := vf.options(a)
			if err != nil {
				return err
			}
			o.Volumes = vols
			img, err := image.OpenVerified(args[0])
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
			o.Image = img
			if err := o.Validate(); err != nil {
				return err
			}
			stdio := vm.Stdio{Stdin: a.commandStdin(interactive), Stdout: a.stdout, Stderr: a.stderr}
			var exit proto.ExitMsg
			if cold {
				exit, err = runCold(ctx, a, argv, o, stdio, timings || asJSON, asJSON)
			} else {
				exit, err = runWarm(ctx, a, argv, o, stdio, timeout, timings || asJSON, asJSON)
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
	vols.add(cmd)
	cmd.Flags().DurationVar(&timeout, "timeout", 0, "kill the VM after this long (e.g. 30s; default: no limit)")
	cmd.Flags().BoolVar(&timings, "timings", false, "print boot phases to stderr: VMM start → kernel → init → rootfs → command started → exited")
	cmd.Flags().BoolVar(&asJSON, "json", false, "print the timings as JSON to stderr")
	cmd.Flags().BoolVar(&cold, "cold", false, "cold-boot instead of restoring a snapshot")
	cmd.Flags().BoolVarP(&interactive, "interactive", "i", false, "forward stdin also when it is a terminal")
	return cmd
}

// printTimings prints phases to stderr, as JSON or as a table.
func printTimings(a *app, phases []vm.Phase, asJSON bool) {
	if asJSON {
		ms := map[string]float64{}
		for _, p := range phases {
			ms[p.Name+"_ms"] = float64(p.Since.Microseconds()) / 1000
		}
		(&app{stdout: a.stderr}).printJSON(ms)
		return
	}
	fmt.Fprintln(a.stderr, "timings (since kiln began starting the VM):")
	var prev time.Duration
	for _, p := range phases {
		fmt.Fprintf(a.stderr, "  %-22s %8.3fs  (+%.3fs)\n", p.Name, p.Since.Seconds(), (p.Since - prev).Seconds())
		prev = p.Since
	}
}

// commandStdin is what a guest command reads: kiln's stdin, unless it is
// a terminal and interactive is false (then nil: /dev/null).
func (a *app) commandStdin(interactive bool) io.Reader {
	if a.stdin == nil {
		return nil
	}
	if f, ok := a.stdin.(*os.File); ok && term.IsTerminal(int(f.Fd())) && !interactive {
		return nil
	}
	return a.stdin
}

// runCold boots the kernel and streams the command's output.
func runCold(ctx context.Context, a *app, argv []string, o vm.Config, stdio vm.Stdio, timings, asJSON bool) (proto.ExitMsg, error) {
	v, err := vm.New(o, vm.WithCommand(argv, nil, stdio))
	if err != nil {
		return proto.ExitMsg{}, err
	}
	defer v.Close()
	if err := v.Start(ctx); err != nil {
		return proto.ExitMsg{}, err
	}
	exit, err := v.Wait(ctx)
	v.Close()
	if timings {
		printTimings(a, v.Timings().Phases(), asJSON)
	}
	return exit, err
}

// runWarm restores (or creates) the image's snapshot and runs the command in
// the warm guest, streaming its output.
func runWarm(ctx context.Context, a *app, argv []string, o vm.Config, stdio vm.Stdio, timeout time.Duration, timings, asJSON bool) (proto.ExitMsg, error) {
	if timeout == 0 {
		timeout = 365 * 24 * time.Hour // kiln run has no limit unless --timeout
	}
	sb, err := sandbox.Start(ctx, o.Image, sandbox.Options{VM: o, Timeout: timeout, SnapshotCreating: a.snapshotNotice})
	if err != nil {
		return proto.ExitMsg{}, err
	}
	defer sb.Close()
	code, err := sb.Run(ctx, argv, nil, stdio)
	if timings {
		printTimings(a, sb.Timings().Phases(), asJSON)
	}
	if err != nil {
		return proto.ExitMsg{}, err
	}
	return proto.ExitMsg{Code: code}, nil
}
