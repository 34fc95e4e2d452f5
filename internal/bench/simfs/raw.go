package simfs

import (
	"github.com/hanwen/go-fuse/v2/fuse"
)

// counting wraps the loopback's raw filesystem: every request is counted
// by kind and delayed by the model before it is passed on.
type counting struct {
	fuse.RawFileSystem
	fs *FS
}

type cancelCh = <-chan struct{}

func (c *counting) Lookup(cancel cancelCh, h *fuse.InHeader, name string, out *fuse.EntryOut) fuse.Status {
	c.fs.op(OpLookup)
	return c.RawFileSystem.Lookup(cancel, h, name, out)
}

func (c *counting) Forget(nodeid, nlookup uint64) {
	c.fs.op(OpForget)
	c.RawFileSystem.Forget(nodeid, nlookup)
}

func (c *counting) GetAttr(cancel cancelCh, in *fuse.GetAttrIn, out *fuse.AttrOut) fuse.Status {
	if in.Flags()&fuse.FUSE_GETATTR_FH != 0 {
		// An open file's attributes (fstat, or the kernel revalidating
		// before a read because the attribute timeout is 0).
		c.fs.op(OpGetAttrFh)
	} else {
		c.fs.op(OpGetAttr)
	}
	return c.RawFileSystem.GetAttr(cancel, in, out)
}

func (c *counting) SetAttr(cancel cancelCh, in *fuse.SetAttrIn, out *fuse.AttrOut) fuse.Status {
	c.fs.op(OpSetAttr)
	return c.RawFileSystem.SetAttr(cancel, in, out)
}

func (c *counting) Mknod(cancel cancelCh, in *fuse.MknodIn, name string, out *fuse.EntryOut) fuse.Status {
	c.fs.op(OpMknod)
	return c.RawFileSystem.Mknod(cancel, in, name, out)
}

func (c *counting) Mkdir(cancel cancelCh, in *fuse.MkdirIn, name string, out *fuse.EntryOut) fuse.Status {
	c.fs.op(OpMkdir)
	return c.RawFileSystem.Mkdir(cancel, in, name, out)
}

func (c *counting) Unlink(cancel cancelCh, h *fuse.InHeader, name string) fuse.Status {
	c.fs.op(OpUnlink)
	return c.RawFileSystem.Unlink(cancel, h, name)
}

func (c *counting) Rmdir(cancel cancelCh, h *fuse.InHeader, name string) fuse.Status {
	c.fs.op(OpRmdir)
	return c.RawFileSystem.Rmdir(cancel, h, name)
}

func (c *counting) Rename(cancel cancelCh, in *fuse.RenameIn, oldName, newName string) fuse.Status {
	c.fs.op(OpRename)
	return c.RawFileSystem.Rename(cancel, in, oldName, newName)
}

func (c *counting) Link(cancel cancelCh, in *fuse.LinkIn, name string, out *fuse.EntryOut) fuse.Status {
	c.fs.op(OpLink)
	return c.RawFileSystem.Link(cancel, in, name, out)
}

func (c *counting) Symlink(cancel cancelCh, h *fuse.InHeader, target, name string, out *fuse.EntryOut) fuse.Status {
	c.fs.op(OpSymlink)
	return c.RawFileSystem.Symlink(cancel, h, target, name, out)
}

func (c *counting) Readlink(cancel cancelCh, h *fuse.InHeader) ([]byte, fuse.Status) {
	c.fs.op(OpReadlink)
	return c.RawFileSystem.Readlink(cancel, h)
}

func (c *counting) Access(cancel cancelCh, in *fuse.AccessIn) fuse.Status {
	c.fs.op(OpAccess)
	return c.RawFileSystem.Access(cancel, in)
}

func (c *counting) GetXAttr(cancel cancelCh, h *fuse.InHeader, attr string, dest []byte) (uint32, fuse.Status) {
	c.fs.op(OpGetXAttr)
	return c.RawFileSystem.GetXAttr(cancel, h, attr, dest)
}

func (c *counting) ListXAttr(cancel cancelCh, h *fuse.InHeader, dest []byte) (uint32, fuse.Status) {
	c.fs.op(OpListXAttr)
	return c.RawFileSystem.ListXAttr(cancel, h, dest)
}

func (c *counting) SetXAttr(cancel cancelCh, in *fuse.SetXAttrIn, attr string, data []byte) fuse.Status {
	c.fs.op(OpSetXAttr)
	return c.RawFileSystem.SetXAttr(cancel, in, attr, data)
}

func (c *counting) RemoveXAttr(cancel cancelCh, h *fuse.InHeader, attr string) fuse.Status {
	c.fs.op(OpRemoveXAttr)
	return c.RawFileSystem.RemoveXAttr(cancel, h, attr)
}

func (c *counting) Create(cancel cancelCh, in *fuse.CreateIn, name string, out *fuse.CreateOut) fuse.Status {
	c.fs.op(OpCreate)
	return c.RawFileSystem.Create(cancel, in, name, out)
}

func (c *counting) Tmpfile(cancel cancelCh, in *fuse.CreateIn, out *fuse.CreateOut) fuse.Status {
	c.fs.op(OpTmpfile)
	return c.RawFileSystem.Tmpfile(cancel, in, out)
}

func (c *counting) Open(cancel cancelCh, in *fuse.OpenIn, out *fuse.OpenOut) fuse.Status {
	c.fs.op(OpOpen)
	return c.RawFileSystem.Open(cancel, in, out)
}

func (c *counting) Read(cancel cancelCh, in *fuse.ReadIn, buf []byte) (fuse.ReadResult, fuse.Status) {
	res, st := c.RawFileSystem.Read(cancel, in, buf)
	n := 0
	if st == fuse.OK && res != nil {
		n = res.Size()
	}
	c.fs.read(n)
	return res, st
}

func (c *counting) Lseek(cancel cancelCh, in *fuse.LseekIn, out *fuse.LseekOut) fuse.Status {
	c.fs.op(OpLseek)
	return c.RawFileSystem.Lseek(cancel, in, out)
}

func (c *counting) GetLk(cancel cancelCh, in *fuse.LkIn, out *fuse.LkOut) fuse.Status {
	c.fs.op(OpLock)
	return c.RawFileSystem.GetLk(cancel, in, out)
}

func (c *counting) SetLk(cancel cancelCh, in *fuse.LkIn) fuse.Status {
	c.fs.op(OpLock)
	return c.RawFileSystem.SetLk(cancel, in)
}

func (c *counting) SetLkw(cancel cancelCh, in *fuse.LkIn) fuse.Status {
	c.fs.op(OpLock)
	return c.RawFileSystem.SetLkw(cancel, in)
}

func (c *counting) Release(cancel cancelCh, in *fuse.ReleaseIn) {
	c.fs.op(OpRelease)
	c.RawFileSystem.Release(cancel, in)
}

func (c *counting) Write(cancel cancelCh, in *fuse.WriteIn, data []byte) (uint32, fuse.Status) {
	c.fs.op(OpWrite)
	return c.RawFileSystem.Write(cancel, in, data)
}

func (c *counting) Writev(cancel cancelCh, in *fuse.WriteIn, data [][]byte) (uint32, fuse.Status) {
	c.fs.op(OpWrite)
	return c.RawFileSystem.Writev(cancel, in, data)
}

func (c *counting) CopyFileRange(cancel cancelCh, in *fuse.CopyFileRangeIn) (uint32, fuse.Status) {
	c.fs.op(OpCopyRange)
	return c.RawFileSystem.CopyFileRange(cancel, in)
}

func (c *counting) Ioctl(cancel cancelCh, in *fuse.IoctlIn, inbuf []byte, out *fuse.IoctlOut, outbuf []byte) fuse.Status {
	c.fs.op(OpIoctl)
	return c.RawFileSystem.Ioctl(cancel, in, inbuf, out, outbuf)
}

func (c *counting) Flush(cancel cancelCh, in *fuse.FlushIn) fuse.Status {
	c.fs.op(OpFlush)
	return c.RawFileSystem.Flush(cancel, in)
}

func (c *counting) Fsync(cancel cancelCh, in *fuse.FsyncIn) fuse.Status {
	c.fs.op(OpFsync)
	return c.RawFileSystem.Fsync(cancel, in)
}

func (c *counting) Fallocate(cancel cancelCh, in *fuse.FallocateIn) fuse.Status {
	c.fs.op(OpFallocate)
	return c.RawFileSystem.Fallocate(cancel, in)
}

func (c *counting) OpenDir(cancel cancelCh, in *fuse.OpenIn, out *fuse.OpenOut) fuse.Status {
	c.fs.op(OpOpenDir)
	return c.RawFileSystem.OpenDir(cancel, in, out)
}

func (c *counting) ReadDir(cancel cancelCh, in *fuse.ReadIn, out *fuse.DirEntryList) fuse.Status {
	c.fs.op(OpReadDir)
	return c.RawFileSystem.ReadDir(cancel, in, out)
}

func (c *counting) ReadDirPlus(cancel cancelCh, in *fuse.ReadIn, out *fuse.DirEntryList) fuse.Status {
	c.fs.op(OpReadDirPlus)
	return c.RawFileSystem.ReadDirPlus(cancel, in, out)
}

func (c *counting) ReleaseDir(in *fuse.ReleaseIn) {
	c.fs.op(OpReleaseDir)
	c.RawFileSystem.ReleaseDir(in)
}

func (c *counting) FsyncDir(cancel cancelCh, in *fuse.FsyncIn) fuse.Status {
	c.fs.op(OpFsyncDir)
	return c.RawFileSystem.FsyncDir(cancel, in)
}

func (c *counting) StatFs(cancel cancelCh, h *fuse.InHeader, out *fuse.StatfsOut) fuse.Status {
	c.fs.op(OpStatFs)
	return c.RawFileSystem.StatFs(cancel, h, out)
}

func (c *counting) Statx(cancel cancelCh, in *fuse.StatxIn, out *fuse.StatxOut) fuse.Status {
	c.fs.op(OpStatx)
	return c.RawFileSystem.Statx(cancel, in, out)
}
