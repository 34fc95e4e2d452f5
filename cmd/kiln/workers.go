package main

import (
	"fmt"
	"net/http"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/kiln-dev/kiln/internal/endpoint/apitype"
)

func newWorkersCmd(a *app) *cobra.Command {
	var cf clientFlags
	var asJSON bool
	cmd := &cobra.Command{
		Use:   "workers",
		Short: "List an endpoint's workers and blocks (pilot jobs)",
		Long: `Workers lists the workers registered with a kiln serve endpoint (node,
Slurm job, block, capacity, tasks running, last heartbeat) and, with the
Slurm provider, its blocks and their Slurm states.`,
		Example: `  kiln workers
  kiln workers --url http://login1:8470 --json`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			c, err := cf.client()
			if err != nil {
				return err
			}
			var list apitype.WorkerList
			if err := c.Do(cmd.Context(), http.MethodGet, "/v1/workers", nil, &list); err != nil {
				return err
			}
			if asJSON {
				return a.printJSON(list)
			}
			now := time.Now()
			tw := tabwriter.NewWriter(a.stdout, 0, 4, 2, ' ', 0)
			fmt.Fprintln(tw, "WORKER\tNODE\tSLURM JOB\tBLOCK\tSTATE\tSLOTS\tCPUS\tMEMORY\tACCEL\tRUNNING\tLEASED\tDONE\tLAST SEEN")
			for _, w := range list.Workers {
				fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%d\t%d\t%d MiB\t%s\t%d\t%d\t%d\t%s ago\n", w.ID, w.Node, dash(w.SlurmJobID), dash(w.BlockID), w.State,
					w.Slots, w.CPUs, w.MemoryMiB, w.Accel, w.Running, w.Leased, w.Done, now.Sub(w.LastSeen).Round(time.Second))
			}
			if len(list.Workers) == 0 {
				fmt.Fprintln(tw, "(no workers)")
			}
			if err := tw.Flush(); err != nil {
				return err
			}
			if len(list.Blocks) > 0 {
				fmt.Fprintln(a.stdout)
				tw = tabwriter.NewWriter(a.stdout, 0, 4, 2, ' ', 0)
				fmt.Fprintln(tw, "BLOCK\tSLURM JOB\tSTATE\tNODES\tREASON\tSUBMITTED")
				for _, b := range list.Blocks {
					fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s ago\n", b.ID, b.JobID, b.State, dash(b.Nodes), dash(strings.TrimSpace(b.Reason)), now.Sub(b.Submitted).Round(time.Second))
				}
				return tw.Flush()
			}
			return nil
		},
	}
	cf.add(cmd)
	cmd.Flags().BoolVar(&asJSON, "json", false, "print the list as JSON")
	return cmd
}

func dash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}
