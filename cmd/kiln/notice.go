package main

import (
	"fmt"
	"os"
	"strings"
	"sync"
	"time"

	"golang.org/x/term"
)

// snapshotNotice tells the user, in one line on stderr, that the first use
// of an image creates its snapshot, and why it takes a while; on a terminal
// the line shows the elapsed time as it goes. It is a
// sandbox.Options.SnapshotCreating hook.
func (a *app) snapshotNotice(preload []string) (done func(error)) {
	what := "booting"
	if len(preload) > 0 {
		what += " and importing " + strings.Join(preload, ", ")
	}
	return a.activity(fmt.Sprintf("first run of this image: %s to create its snapshot; later runs restore in under a second", what))
}

// activity prints msg as one line on stderr for something long that has
// begun; on a terminal the line ticks with the elapsed time until done is
// called, which ends it with the total (or the failure).
func (a *app) activity(msg string) (done func(error)) {
	f, ok := a.stderr.(*os.File)
	if !ok || !term.IsTerminal(int(f.Fd())) {
		fmt.Fprintf(a.stderr, "kiln: %s\n", msg)
		return func(error) {}
	}
	start := time.Now()
	stop, stopped := make(chan struct{}), make(chan struct{})
	line := func() string { return fmt.Sprintf("\r\033[Kkiln: %s (%.1fs)", msg, time.Since(start).Seconds()) }
	go func() {
		defer close(stopped)
		t := time.NewTicker(200 * time.Millisecond)
		defer t.Stop()
		for {
			fmt.Fprint(a.stderr, line())
			select {
			case <-stop:
				return
			case <-t.C:
			}
		}
	}()
	var once sync.Once
	return func(err error) {
		once.Do(func() {
			close(stop)
			<-stopped
			if err != nil {
				fmt.Fprintf(a.stderr, "%s: failed\n", line())
				return
			}
			fmt.Fprintf(a.stderr, "%s: done\n", line())
		})
	}
}
