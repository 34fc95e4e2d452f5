package main

import (
	"errors"
	"fmt"
	"os"
	"slices"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"github.com/kiln-dev/kiln/internal/guest/task"
	"github.com/kiln-dev/kiln/internal/sandbox"
)

func newInvokeCmd(a *app) *cobra.Command {
	var vf vmFlags
	var fn, file, args, kwargs string
	var timeout time.Duration
	var repeat, maxResult int
	var cold, timings bool
	cmd := &cobra.Command{
		Use:   "invoke IMAGE --function MOD:FN | --file handler.py --function FN",
		Short: "Call a Python function in a warm VM and print its JSON result",
		Long: `Invoke boots IMAGE with kiln's agent, calls the function with the given
arguments and prints the result as JSON: value, stdout, stderr, timings. A
function named MOD:FN is imported inside the image; with --file the
function's source is sent (so client and guest need not share a Python or
pickle version). --repeat reuses the warm VM and prints latency statistics.

The VM is restored from a snapshot of the image taken after boot and after
importing the spec's preload modules (created on first use); --cold boots
a kernel instead.`,
		Example: `  kiln invoke numpy.kimg --function math:factorial --args '[20]'
  kiln invoke numpy.kimg --file handler.py --function work --args '[1000]' --kwargs '{"seed": 1}'
  kiln invoke numpy.kimg --file handler.py --function work --repeat 100
  kiln invoke numpy.kimg --file loop.py --function spin --timeout 5s`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, argv []string) error {
			t, err := makeTask(fn, file, args, kwargs)
			if err != nil {
				return err
			}
			o, err := vf.options(a)
			if err != nil {
				return err
			}
			so := sandbox.Options{Launch: o, Timeout: timeout, MaxResult: maxResult}
			if cold {
				so.Snapshots = sandbox.SnapshotOff
			}
			sb, err := sandbox.Start(cmd.Context(), argv[0], so)
			if err != nil {
				return err
			}
			defer sb.Close()
			if timings {
				defer func() { printTimings(a, sb.Timings(), false) }()
			}
			if repeat <= 1 {
				res, err := sb.Invoke(cmd.Context(), t)
				if err != nil {
					return err
				}
				if err := a.printJSON(res); err != nil {
					return err
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
			st := latencyStats(lat)
			st["failed"] = float64(failed)
			return a.printJSON(st)
		},
	}
	vf.add(cmd)
	f := cmd.Flags()
	f.StringVar(&fn, "function", "", "MOD:FN to import in the image, or with --file the function's name")
	f.StringVar(&file, "file", "", "a Python file whose source is sent; --function names the function in it")
	f.StringVar(&args, "args", "[]", "positional arguments as a JSON list")
	f.StringVar(&kwargs, "kwargs", "{}", "keyword arguments as a JSON object")
	f.DurationVar(&timeout, "timeout", sandbox.DefaultTimeout, "per-call limit; the VM is killed and replaced when it passes")
	f.IntVar(&repeat, "repeat", 1, "call N times on the same warm VM and print latency min/median/p90/max")
	f.IntVar(&maxResult, "max-result", sandbox.DefaultMaxResult, "largest result in bytes")
	f.BoolVar(&cold, "cold", false, "cold-boot instead of restoring a snapshot (the first use of an image creates its snapshot)")
	f.BoolVar(&timings, "timings", false, "print the VM's phases to stderr: VMM start, state load (restore) or boot phases, first result")
	return cmd
}

func makeTask(fn, file, args, kwargs string) (*task.Task, error) {
	t := &task.Task{}
	switch {
	case file != "":
		src, err := os.ReadFile(file)
		if err != nil {
			return nil, fmt.Errorf("reading --file: %w", err)
		}
		t.Kind, t.Source, t.Name = "source", string(src), fn
	case fn != "":
		if !strings.Contains(fn, ":") {
			return nil, fmt.Errorf("--function %q: want MOD:FN (e.g. math:factorial), or --file FILE --function FN", fn)
		}
		t.Kind, t.Ref = "ref", fn
	default:
		return nil, errors.New("nothing to call: give --function MOD:FN, or --file handler.py --function FN")
	}
	var err error
	if t.Args, err = jsonValue("--args", args, '['); err != nil {
		return nil, err
	}
	if t.Kwargs, err = jsonValue("--kwargs", kwargs, '{'); err != nil {
		return nil, err
	}
	return t, nil
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
