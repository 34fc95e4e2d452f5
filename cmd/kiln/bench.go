package main

import (
	"fmt"
	"time"

	"github.com/spf13/cobra"

	"github.com/kiln-dev/kiln/internal/bench"
	"github.com/kiln-dev/kiln/internal/bench/simfs"
)

func newBenchCmd(a *app) *cobra.Command {
	var o bench.Options
	var model string
	cmd := &cobra.Command{
		Use:   "bench files|imports|coldstart|all|plot",
		Short: "Run the benchmark experiments against a simulated shared filesystem",
		Long: `Bench reproduces kiln's experiments and writes CSV, Markdown and PNG files
into --out:

  files      read 200 MB split into 1 … 100,000 files, local disk vs the model
  imports    import numpy/scipy/torch from a many-files tree, a loop-mounted
             kiln image and a kiln VM, all on the model, sweeping its
             metadata latency; counts metadata operations
  coldstart  the same numpy job as a process, a bubblewrap container, a kiln
             cold boot and a kiln snapshot restore, interleaved (min/max/mean)
  plot       redraw the PNG files from the CSV files in --out

The shared filesystem is a model: a FUSE passthrough (needs /dev/fuse and
root) that adds latency to metadata operations and reads and counts them;
its parameters are printed next to every result. Trees, images and test
files are cached under <cache>/bench. A full run takes an hour or more
(torch is large; VM rows run under TCG without KVM); --quick takes minutes.`,
		Example: `  kiln bench all --quick --out /tmp/bench
  kiln bench imports --model lustre-busy --out results/
  kiln bench coldstart --runs 20 --model meta=2ms,read=0.5ms,bw=500`,
		Args:      cobra.ExactArgs(1),
		ValidArgs: append([]string{"all", "plot"}, bench.Experiments...),
		RunE: func(cmd *cobra.Command, args []string) error {
			if args[0] == "plot" {
				files, err := bench.Replot(o.Out)
				for _, f := range files {
					fmt.Fprintln(a.stdout, "wrote", f)
				}
				if err == nil && len(files) == 0 {
					err = fmt.Errorf("no files.csv, imports.csv or coldstart.csv in %s: run kiln bench first", o.Out)
				}
				return err
			}
			p, err := simfs.ParseParams(model)
			if err != nil {
				return fmt.Errorf("--model: %w", err)
			}
			o.Model = p
			o.Log = a.logger()
			o.Progress = a.stderr
			o.Accel = a.accel()
			t0 := time.Now()
			var reps []*bench.Report
			if args[0] == "all" {
				reps, err = bench.All(cmd.Context(), o)
			} else {
				var r *bench.Report
				r, err = bench.Run(cmd.Context(), args[0], o)
				if r != nil {
					reps = append(reps, r)
				}
			}
			for _, r := range reps {
				fmt.Fprintf(a.stdout, "%s\n", r.Markdown())
				for _, f := range r.Files {
					fmt.Fprintln(a.stdout, "wrote", f)
				}
				fmt.Fprintln(a.stdout)
			}
			fmt.Fprintf(a.stderr, "kiln bench: finished in %s\n", time.Since(t0).Round(time.Second))
			return err
		},
	}
	f := cmd.Flags()
	f.StringVar(&o.Out, "out", ".", "directory for the CSV, Markdown and PNG results")
	f.BoolVar(&o.Quick, "quick", false, "small sizes and few runs: a smoke test of a few minutes (numbers are not a measurement)")
	f.StringVar(&model, "model", "lustre-idle", "filesystem model for coldstart and the base of the imports sweep: a preset (local, lustre-idle, lustre-busy) and/or meta=DUR,read=DUR,bw=MB/s")
	f.IntVar(&o.Runs, "runs", 0, "runs per measurement (default: coldstart 10, imports 2; --quick: 2 and 1)")
	f.StringSliceVar(&o.Packages, "packages", nil, "packages for imports (default: numpy,scipy,torch; --quick: numpy)")
	f.BoolVar(&o.NoVM, "no-vm", false, "leave out the rows that boot VMs")
	f.StringVar(&o.Work, "work", "", "directory for generated files, trees and images, on a local disk (default: <cache>/bench)")
	return cmd
}
