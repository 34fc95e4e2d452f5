package main

import (
	"fmt"
	"time"

	"github.com/spf13/cobra"

	"github.com/kiln-dev/kiln/internal/bench"
	"github.com/kiln-dev/kiln/internal/bench/simfs"
	"github.com/kiln-dev/kiln/internal/size"
)

func newBenchCmd(a *app) *cobra.Command {
	var o bench.Options
	var model string
	cmd := &cobra.Command{
		Use:   "bench files|imports|coldstart|boot|invoke|all|plot|clean",
		Short: "Run the benchmark experiments (shared-filesystem model, boot, invocation)",
		Long: `Bench reproduces kiln's experiments and writes CSV, Markdown and PNG files
into --out:

  files      read 200 MB split into 1 … 100,000 files, local disk vs the model
  imports    import numpy/scipy/torch from a many-files tree, a loop-mounted
             kiln image and a kiln VM, all on the model, sweeping its
             metadata latency; counts metadata operations
  coldstart  the same numpy job as a process, a bubblewrap container, a kiln
             cold boot and a kiln snapshot restore, interleaved (min/max/mean)
  boot       the numpy image with kiln's kernel on a microvm and on q35,
             Debian's kernel on q35, erofs uncompressed and squashfs zstd,
             --runs rounds (default 5), interleaved: image size, boot
             phases, import numpy, first result cold and restored
  invoke     warm-call latency (no-op and numpy) on one kiln VM, in a new
             host python3 process per call and in one warm host python3,
             interleaved; then the PSS of snapshot clones side by side
             against a cold-booted VM
  all        every experiment above, in this order
  plot       redraw the PNG files from the CSV files in --out
  clean      remove the cached trees, images and test files (--work)

files, imports and coldstart use the shared-filesystem model: a FUSE
passthrough (needs /dev/fuse and root) that adds latency to metadata
operations and reads and counts them; its parameters are printed next to
every result. boot and invoke run from the local disk and need no model
and no root. Trees, images and test files are cached under <cache>/bench.
A full run takes an hour or more (torch is large; VM rows run under TCG
without KVM); --quick takes minutes.`,
		Example: `  kiln bench all --quick --out /tmp/bench
  kiln bench boot --runs 10 --out results/
  kiln bench imports --model lustre-busy --out results/
  kiln bench coldstart --runs 20 --model meta=2ms,read=0.5ms,bw=500
  kiln bench clean`,
		Args:      cobra.ExactArgs(1),
		ValidArgs: append([]string{"all", "plot", "clean"}, bench.Experiments...),
		RunE: func(cmd *cobra.Command, args []string) error {
			if args[0] == "clean" {
				dir, freed, err := bench.Clean(o.Work)
				if err != nil {
					return err
				}
				fmt.Fprintf(a.stdout, "removed %s from %s\n", size.Format(freed), dir)
				return nil
			}
			if args[0] == "plot" {
				files, err := bench.Replot(o.Out)
				for _, f := range files {
					fmt.Fprintln(a.stdout, "wrote", f)
				}
				if err == nil && len(files) == 0 {
					err = fmt.Errorf("no files.csv, imports.csv, coldstart.csv or boot.csv in %s: run kiln bench first", o.Out)
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
	f.IntVar(&o.Runs, "runs", 0, "runs per measurement (default: coldstart 10, imports 2, boot 5, invoke 100 calls; --quick: 2, 1, 1 and 10)")
	f.StringSliceVar(&o.Packages, "packages", nil, "packages for imports (default: numpy,scipy,torch; --quick: numpy)")
	f.BoolVar(&o.NoVM, "no-vm", false, "leave out the rows that boot VMs (and with all, the boot experiment)")
	f.StringVar(&o.Work, "work", "", "directory for generated files, trees and images, on a local disk (default: <cache>/bench)")
	return cmd
}
