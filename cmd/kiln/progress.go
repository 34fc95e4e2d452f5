package main

import (
	"fmt"
	"io"
	"os"
	"sync"
	"time"

	"golang.org/x/term"
)

// progress shows build steps: on a terminal a live line per step with a
// ticking elapsed time, otherwise one plain line per finished step.
type progress struct {
	w     io.Writer
	tty   bool
	mu    sync.Mutex
	n     int
	start time.Time
	stop  chan struct{}
	done  chan struct{}
}

func newProgress(w io.Writer) *progress {
	p := &progress{w: w}
	if f, ok := w.(*os.File); ok && term.IsTerminal(int(f.Fd())) {
		p.tty = true
	}
	return p
}

func (p *progress) step(name string, done bool, detail string) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if !done {
		p.n++
		p.start = time.Now()
		if p.tty {
			p.stop, p.done = make(chan struct{}), make(chan struct{})
			go p.tick(p.n, name, p.start, p.stop, p.done)
		}
		return
	}
	if p.stop != nil {
		close(p.stop)
		p.mu.Unlock()
		<-p.done
		p.mu.Lock()
		p.stop = nil
	}
	line := fmt.Sprintf("[%d] %-22s %6.1fs  %s", p.n, name, time.Since(p.start).Seconds(), detail)
	if p.tty {
		fmt.Fprintf(p.w, "\r\033[K%s\n", line)
	} else {
		fmt.Fprintln(p.w, line)
	}
}

func (p *progress) tick(n int, name string, start time.Time, stop, done chan struct{}) {
	defer close(done)
	t := time.NewTicker(200 * time.Millisecond)
	defer t.Stop()
	for {
		select {
		case <-stop:
			return
		case <-t.C:
			fmt.Fprintf(p.w, "\r\033[K[%d] %-22s %6.1fs …", n, name, time.Since(start).Seconds())
		}
	}
}

// fail ends a live line after an error.
func (p *progress) fail() {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.stop != nil {
		close(p.stop)
		<-p.done
		p.stop = nil
		fmt.Fprintln(p.w)
	}
}
