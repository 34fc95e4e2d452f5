package main

import (
	"fmt"
	"slices"
	"time"

	"github.com/spf13/cobra"

	"github.com/kiln-dev/kiln/internal/image"
	"github.com/kiln-dev/kiln/internal/sandbox"
	"github.com/kiln-dev/kiln/internal/size"
)

func newInvokeCmd(a *app) *cobra.Command {
	var vf vmFlags
	var vols volumeFlags
	var tf taskFlags
	var timeout time.Duration
	var repeat, maxResult, maxOutput int
	var cold, timings, stream bool
	cmd := &cobra.Command{
		Use:   "invoke IMAGE --function MOD:FN | --file handler.py --function FN",
		Short: "Call a Python function in a warm VM and print its JSON result",
		Long: `Invoke boots IMAGE with kiln's agent, calls the function with the given
arguments and prints the result as JSON: value, stdout, stderr, timings. A
function named MOD:FN is imported inside the image; with --file the
function's source is sent (so client and guest need not share a Python or
pickle version). --repeat reuses the warm VM and prints latency statistics.
What the function writes to fd 1 and 2 (print, C extensions, os.write,
subprocesses) is captured in the result, up to --max-output each.

The VM is restored from a snapshot of the image taken after boot and after
importing the spec's preload modules (created on first use); --cold boots
a kernel instead. --volume HOST:GUEST[:ro|:rw] shares a host directory
with the function, read-only unless :rw.`,
		Example: `  kiln invoke numpy.kimg --function math:factorial --args '[20]'
  kiln invoke numpy.kimg --file handler.py --function work --args '[1000]' --kwargs '{"seed": 1}'
  kiln invoke numpy.kimg --file handler.py --function work --repeat 100
  kiln invoke numpy.kimg --file loop.py --function spin --timeout 5s
  kiln invoke numpy.kimg --file train.py --function train --stream
  kiln invoke numpy.kimg --volume ./data:/data --file stats.py --function mean --args '["/data/x.csv"]'`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, argv []string) error {
			t, err := tf.task()
			if err != nil {
				return err
			}
			o, err := vf.options(a)
			if err != nil {
				return err
			}
			o.Volumes = vols
			img, err := image.OpenVerified(argv[0])
			if err != nil {
				return err
			}
			so := sandbox.Options{VM: o, Timeout: timeout, MaxResult: maxResult, MaxOutput: maxOutput, SnapshotCreating: a.snapshotNotice}
			if cold {
				so.Snapshots = sandbox.SnapshotOff
			}
			sb, err := sandbox.Start(cmd.Context(), img, so)
			if err != nil {
				return err
			}
			defer sb.Close()
			if timings {
				defer func() { printTimings(a, sb.Timings().Phases(), false) }()
			}
			var st sandbox.Streams
			if stream {
				st.Stdout, st.Stderr = a.stderr, a.stderr
			}
			if repeat <= 1 {
				res, err := sb.InvokeStreams(cmd.Context(), t, st)
				if err != nil {
					return err
				}
				if err := a.printJSON(res); err != nil {
					return err
				}
				for _, c := range []struct {
					name string
					cut  bool
				}{{"stdout", res.StdoutTruncated}, {"stderr", res.StderrTruncated}} {
					if c.cut {
						fmt.Fprintf(a.stderr, "kiln: the task's %s was truncated at %s (--max-output raises the cap; --stream shows all of it)\n", c.name, size.Format(int64(maxOutput)))
					}
				}
				if !res.OK {
					return exitCode(1)
				}
				return nil
			}
			lat := make([]time.Duration, 0, repeat)
			failed := 0
			for i := 0; i < repeat; i++ {
				t0 := time.Now()
				res, err := sb.Invoke(cmd.Context(), t)
				lat = append(lat, time.Since(t0))
				if err != nil {
					return fmt.Errorf("call %d of %d: %w", i+1, repeat, err)
				}
				if !res.OK {
					failed++
				}
			}
			stats := latencyStats(lat)
			stats["failed"] = float64(failed)
			return a.printJSON(stats)
		},
	}
	vf.add(cmd)
	vols.add(cmd)
	f := cmd.Flags()
	tf.add(cmd)
	f.DurationVar(&timeout, "timeout", sandbox.DefaultTimeout, "per-call limit; the VM is killed and replaced when it passes")
	f.IntVar(&repeat, "repeat", 1, "call N times on the same warm VM and print latency min/median/p90/max")
	f.IntVar(&maxResult, "max-result", sandbox.DefaultMaxResult, "largest result in bytes")
	f.IntVar(&maxOutput, "max-output", sandbox.DefaultMaxOutput, "bytes of stdout and of stderr kept in the result, each")
	f.BoolVar(&stream, "stream", false, "print the task's stdout and stderr to stderr while it runs (the JSON result still goes to stdout)")
	f.BoolVar(&cold, "cold", false, "cold-boot instead of restoring a snapshot (the first use of an image creates its snapshot)")
	f.BoolVar(&timings, "timings", false, "print the VM's phases to stderr: VMM start, state load (restore) or boot phases, first result")
	return cmd
}

// latencyStats summarises call latencies in milliseconds.
func latencyStats(d []time.Duration) map[string]float64 {
	s := slices.Clone(d)
	slices.Sort(s)
	q := func(p float64) float64 {
		i := int(p * float64(len(s)-1))
		return float64(s[i].Microseconds()) / 1000
	}
	return map[string]float64{"calls": float64(len(s)), "min_ms": q(0), "median_ms": q(0.5), "p90_ms": q(0.9), "max_ms": q(1)}
}
