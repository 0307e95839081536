"""Lists (or prints one file of) a remote zip/jar/wheel without downloading it: HTTP Range
requests read only the central directory and the file asked for.

    python3 deploy/helm/rzip.py URL              # sizes and names
    python3 deploy/helm/rzip.py URL cat PATH     # one file's text
"""
import sys, io, zipfile, urllib.request
class R(io.RawIOBase):
    def __init__(s,url):
        s.url=url; s.pos=0
        req=urllib.request.Request(url,method='HEAD')
        s.size=int(urllib.request.urlopen(req).headers['Content-Length']); s.cache={}
    def seekable(s): return True
    def readable(s): return True
    def tell(s): return s.pos
    def seek(s,o,w=0):
        s.pos = o if w==0 else (s.pos+o if w==1 else s.size+o); return s.pos
    def readinto(s,b):
        n=len(b)
        if s.pos>=s.size: return 0
        end=min(s.size,s.pos+n)-1
        req=urllib.request.Request(s.url,headers={'Range':f'bytes={s.pos}-{end}'})
        data=urllib.request.urlopen(req).read()
        b[:len(data)]=data; s.pos+=len(data); return len(data)
url=sys.argv[1]
z=zipfile.ZipFile(io.BufferedReader(R(url),buffer_size=1<<16))
if len(sys.argv)>2 and sys.argv[2]=='cat':
    sys.stdout.write(z.read(sys.argv[3]).decode())
else:
    for i in z.infolist(): print(i.file_size, i.filename)
