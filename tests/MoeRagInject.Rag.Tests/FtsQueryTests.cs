namespace MoeRagInject.Rag.Tests;

public class FtsQueryTests
{
    [Fact]
    public void QuotesEachTermAndOrsThem()
    {
        Assert.Equal("\"rhine\" OR \"s\" OR \"sea\"", FtsQuery.Build("What is the Rhine's \"sea\"?"));
        Assert.Equal("\"near\" OR \"quantum\" OR \"physics\"", FtsQuery.Build("NEAR(quantum AND physics*"));
        Assert.Equal("\"量子\" OR \"ünïcödé\"", FtsQuery.Build("量子: Ünïcödé!"));
        Assert.Null(FtsQuery.Build("?!. -- * \"\" ()"));
        Assert.Null(FtsQuery.Build(""));
        Assert.Equal("\"the\" OR \"is\"", FtsQuery.Build("the is"));  // only stop words: keep them
    }

    [Fact]
    public void CapsTheNumberOfTerms()
    {
        string query = string.Join(" ", Enumerable.Range(0, 500).Select(i => $"w{i}"));
        Assert.Equal(FtsQuery.MaxTerms, FtsQuery.Build(query)!.Split(" OR ").Length);
    }
}
