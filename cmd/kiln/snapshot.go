package main

import (
	"errors"
	"fmt"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/kiln-dev/kiln/internal/size"
	"github.com/kiln-dev/kiln/internal/snapshot"
)

// snapshotOpts holds the flags every snapshot subcommand shares.
type snapshotOpts struct {
	dir string
}

// store opens the snapshot store chosen by --dir, $KILN_SNAPSHOTS or the cache.
func (o *snapshotOpts) store(a *app) (*snapshot.Store, error) {
	s, err := snapshot.Open(o.dir)
	if err != nil {
		return nil, err
	}
	s.Log = a.logger()
	return s, nil
}

func newSnapshotCmd(a *app) *cobra.Command {
	o := &snapshotOpts{}
	cmd := &cobra.Command{
		Use:   "snapshot",
		Short: "List, remove and garbage-collect VM snapshots",
		Long: `A snapshot is the memory and device state of a booted, preloaded, idle VM.
Restoring one replaces a cold boot (seconds under TCG) with a restore
(a fraction of a second). Snapshots live in $KILN_SNAPSHOTS, else in the
"snapshots" directory of the kiln cache. Each is valid for exactly one image,
kernel, QEMU version, accelerator, memory size, vCPU count, device set and
preload list; kiln verifies it before every restore and cold-boots instead
when it is missing, damaged or made by another version.`,
		Example: `  kiln snapshot ls
  kiln snapshot ls --json | jq '.[].id'
  kiln snapshot rm 3f2a9c
  kiln snapshot gc
  kiln snapshot gc --all`,
	}
	cmd.PersistentFlags().StringVar(&o.dir, "dir", "", "snapshot store directory (default $KILN_SNAPSHOTS, else <cache>/snapshots)")
	// `kiln snapshot create IMAGE` lives in snapshot_create.go.
	cmd.AddCommand(newSnapshotCreateCmd(a, o), newSnapshotLsCmd(a, o), newSnapshotRmCmd(a, o), newSnapshotGCCmd(a, o))
	return cmd
}

func newSnapshotLsCmd(a *app, o *snapshotOpts) *cobra.Command {
	var asJSON bool
	cmd := &cobra.Command{
		Use:     "ls",
		Aliases: []string{"list"},
		Short:   "List snapshots, oldest first",
		Long: `List snapshots, oldest first. Listing reads each snapshot's meta.json only;
the files are verified when a snapshot is restored (or by kiln snapshot gc).`,
		Example: "  kiln snapshot ls\n  kiln snapshot ls --json",
		Args:    cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			s, err := o.store(a)
			if err != nil {
				return err
			}
			entries, err := s.List()
			if err != nil {
				return err
			}
			if asJSON {
				if entries == nil {
					entries = []snapshot.Entry{}
				}
				return a.printJSON(entries)
			}
			if len(entries) == 0 {
				fmt.Fprintf(a.stderr, "no snapshots in %s\n", s.Dir)
				return nil
			}
			w := tabwriter.NewWriter(a.stdout, 0, 4, 2, ' ', 0)
			fmt.Fprintln(w, "ID\tIMAGE\tACCEL\tMEMORY\tVCPUS\tPRELOAD\tDISK\tCREATED\tLAST USED")
			var total int64
			for _, e := range entries {
				k := e.Key
				preload := strings.Join(k.Preload, ",")
				if preload == "" {
					preload = "-"
				}
				fmt.Fprintf(w, "%s\t%s\t%s\t%d MiB\t%d\t%s\t%s\t%s\t%s\n",
					e.ID, snapshotShortDigest(k.ImageDigest), k.Accel, k.MemoryMiB, k.VCPUs, preload,
					size.Format(e.DiskUsage), snapshotAgo(e.Meta.Created), snapshotAgo(e.LastUsed))
				total += e.DiskUsage
			}
			if err := w.Flush(); err != nil {
				return err
			}
			budget := "no budget"
			if b, err := s.Budget(); err != nil {
				return err
			} else if b > 0 {
				budget = "budget " + size.Format(b) + " (" + snapshot.BudgetEnv + "; least recently used evicted beyond it)"
			}
			fmt.Fprintf(a.stdout, "%d snapshots, %s on disk, %s, in %s\n", len(entries), size.Format(total), budget, s.Dir)
			return nil
		},
	}
	cmd.Flags().BoolVar(&asJSON, "json", false, "print JSON")
	return cmd
}

func newSnapshotRmCmd(a *app, o *snapshotOpts) *cobra.Command {
	return &cobra.Command{
		Use:     "rm ID...",
		Aliases: []string{"remove"},
		Short:   "Remove snapshots by ID (a unique prefix is enough)",
		Long: `Remove snapshots by ID, as printed by kiln snapshot ls; a unique prefix is
enough. VMs already restored from a snapshot keep running.`,
		Example: "  kiln snapshot rm 3f2a9c\n  kiln snapshot rm $(kiln snapshot ls --json | jq -r '.[].id')",
		Args:    cobra.MinimumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			s, err := o.store(a)
			if err != nil {
				return err
			}
			var errs []error
			for _, arg := range args {
				id, err := s.ResolveID(arg)
				if err == nil {
					err = s.Remove(id)
				}
				if err != nil {
					errs = append(errs, err)
					continue
				}
				fmt.Fprintf(a.stdout, "removed %s\n", id)
			}
			return errors.Join(errs...)
		},
	}
}

func newSnapshotGCCmd(a *app, o *snapshotOpts) *cobra.Command {
	var all bool
	cmd := &cobra.Command{
		Use:   "gc",
		Short: "Remove damaged snapshots and leftovers of interrupted snapshot runs",
		Long: `Verify every snapshot and remove those that fail (missing or damaged files,
another format version), plus temporary directories left by interrupted
snapshot runs, then evict the least recently used snapshots beyond the
store's budget ($KILN_SNAPSHOT_BUDGET, default 20% of the free disk; also
done after every snapshot is created). With --all, remove every snapshot. Snapshots another kiln
process is creating or removing right now are skipped.`,
		Example: "  kiln snapshot gc\n  kiln snapshot gc --all",
		Args:    cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			s, err := o.store(a)
			if err != nil {
				return err
			}
			var keep func(snapshot.Entry) bool
			if all {
				keep = func(snapshot.Entry) bool { return false }
			}
			removed, err := s.GC(keep)
			if evicted, perr := s.Prune(); perr != nil {
				err = errors.Join(err, perr)
			} else {
				removed = append(removed, evicted...)
			}
			for _, id := range removed {
				fmt.Fprintf(a.stdout, "removed %s\n", id)
			}
			fmt.Fprintf(a.stderr, "kiln: removed %d snapshots from %s\n", len(removed), s.Dir)
			return err
		},
	}
	cmd.Flags().BoolVar(&all, "all", false, "remove every snapshot")
	return cmd
}

// snapshotShortDigest abbreviates a digest for tables.
func snapshotShortDigest(digest string) string {
	if len(digest) > 12 {
		return digest[:12]
	}
	return digest
}

// snapshotAgo formats t relative to now, coarsely.
func snapshotAgo(t time.Time) string {
	if t.IsZero() {
		return "-"
	}
	d := time.Since(t)
	switch {
	case d < time.Minute:
		return "just now"
	case d < time.Hour:
		return fmt.Sprintf("%dm ago", int(d/time.Minute))
	case d < 48*time.Hour:
		return fmt.Sprintf("%dh ago", int(d/time.Hour))
	}
	return t.Local().Format("2006-01-02")
}
